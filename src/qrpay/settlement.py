"""Settlement: turn gateway uploads into charges and catch what no single
offline gateway can see (docs/SETTLEMENT.md).

`ingest` applies a signed batch atomically and idempotently; every token in
it is verified again. The verdicts (charged, double spend, clone, overspend)
are derived from all stored records by the vectorised kernel in ledger.py.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from qrpay import _args, clearing, credit, storedb, tokenspool
from qrpay import archive as archive_module
from qrpay._segments import lexsorted
from qrpay.clearing import FeeSchedule, OperatorClearing, Statement
from qrpay.credential import Scene
from qrpay.credit import DEFAULT_DUE_AFTER
from qrpay.denylist import DenyList, _serial_array, sign_deny_delta, sign_deny_list
from qrpay.errors import (
    ArchiveUnavailable, Conflict, InvalidArgument, InvalidKey, IssuerKeyRole, MalformedMessage,
    PeriodClosed, Reason, StaleUpdate, StoreUnavailable, UnknownGateway, UnknownKeyId,
)
from qrpay.format import (
    PUBLIC_KEY_LEN, TAG_BATCH, TAG_PERIOD, TOKEN_DEVICE_SIG, TOKEN_DTYPE, TOKEN_LEN, U32_MAX,
)
from qrpay.keys import GatewayPublicKey, IssuerKey, IssuerPublicKey, RootPublicKey, SettlementKey
from qrpay.ledger import RECORD_DTYPE
from qrpay.periods import (
    CHARGE_DTYPE, Carry, Settled, Table, TailIndex, carry_forward, charges_from_table,
    charges_table, index_tail, pack_tables, period_charges, settle_period, unpack_tables,
    with_room,
)
from qrpay.reports import Finding as Finding  # re-exported: callers import it from here
from qrpay.reports import Report as Report
from qrpay.reports import (
    add_to_holes, build_report, holes_as_findings, report_from_tables, report_tables,
)
from qrpay.storedb import STORE_FILE as STORE_FILE  # re-exported: the CLI checks for it
from qrpay.storedb import StoreDatabase, Transaction
from qrpay.token import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, BatchResult, _check_window, as_token_array, verify_batch,
)
from qrpay.trust import Role, TrustedKey, TrustStore
from qrpay.trustbundle import TrustBundle
from qrpay.wire import body_map, sign_document, split_document, verify_document

CLOSE_LOCK = "close"   # held while a period closes or a token part is written (_closing)
_log = logging.getLogger("qrpay.settlement")
_DAMAGED_TOKENS = ("settlement store: a live batch's tokens do not match its records (the "
                   "store is damaged)")
MAX_RECORDS_PER_BATCH = 100_000
MAX_REFERENCE = 128   # characters of a repayment's reference (a bank's is 35 or fewer)
_BATCH_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "gateway": bytes, "seq": int, "first": int, "last": int, "created_at": int,
    "records": list,
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS gateways (id TEXT PRIMARY KEY, public BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    arrival INTEGER PRIMARY KEY,
    gateway TEXT NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    records BLOB NOT NULL,
    tokens BLOB NOT NULL,
    UNIQUE (gateway, seq)
);
CREATE TABLE IF NOT EXISTS deny_lists (version INTEGER PRIMARY KEY, document BLOB NOT NULL);
-- Trust bundles (signed by the root key gateways are provisioned with), as given.
CREATE TABLE IF NOT EXISTS trust_bundles (version INTEGER PRIMARY KEY, document BLOB NOT NULL);
-- Signed deltas to each deny list from the DENY_DELTAS versions before it.
CREATE TABLE IF NOT EXISTS deny_deltas (
    base INTEGER NOT NULL, version INTEGER NOT NULL, document BLOB NOT NULL,
    PRIMARY KEY (base, version)
);
CREATE TABLE IF NOT EXISTS repayments (
    id INTEGER PRIMARY KEY, account INTEGER NOT NULL, amount INTEGER NOT NULL,
    paid_at INTEGER NOT NULL, reference TEXT
);
CREATE TABLE IF NOT EXISTS issuer_keys (
    kid BLOB PRIMARY KEY, public BLOB NOT NULL, not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL, roles INTEGER NOT NULL
);
-- The references of the repayments moved to a period's archive, by a
-- 64-bit hash of each: enough to know where to look when one comes again.
CREATE TABLE IF NOT EXISTS repayment_refs (
    hash INTEGER NOT NULL, period INTEGER NOT NULL, PRIMARY KEY (hash, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS periods (
    number INTEGER PRIMARY KEY, from_time INTEGER NOT NULL, until INTEGER NOT NULL,
    closed_at INTEGER NOT NULL, records INTEGER NOT NULL, charged_total INTEGER NOT NULL,
    rejected_total INTEGER NOT NULL, summary BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS carry (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fee_schedules (version INTEGER PRIMARY KEY, document BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS flagged (serial INTEGER PRIMARY KEY, period INTEGER NOT NULL);
-- The parts of live tokens written to the archive's spool (tokenspool.py):
-- the batches from first_arrival to last_arrival with no tokens left in
-- their rows, and the archive's description of the part's files.
CREATE TABLE IF NOT EXISTS token_parts (
    name TEXT PRIMARY KEY, first_arrival INTEGER NOT NULL, last_arrival INTEGER NOT NULL,
    rows INTEGER NOT NULL, written BLOB NOT NULL
)
"""
# After the migrations (some index their columns).
_INDEXES = """
-- Older rows keep a NULL reference, which UNIQUE lets repeat.
CREATE UNIQUE INDEX IF NOT EXISTS repayments_reference ON repayments(reference);
-- Chunks are chosen from the index: the columns after a chunk's blob are
-- only reached through its overflow pages.
CREATE INDEX IF NOT EXISTS carry_chunks ON carry(name, first_time, amount);
-- What a report or close reads stays a day's worth while the tables keep
-- every batch and repayment ever: the live batches, the repayments not
-- folded yet, and each gateway's ranges in order (sequence gaps) come from
-- indexes.
CREATE INDEX IF NOT EXISTS batches_live ON batches(arrival) WHERE period IS NULL;
CREATE INDEX IF NOT EXISTS repayments_unfolded ON repayments(paid_at) WHERE folded = 0;
CREATE INDEX IF NOT EXISTS batches_ranges ON batches(gateway, first, last)
"""
# The columns of a batch row other than its records, tokens and period.
_BATCH_KEYS = ("arrival", "gateway", "seq", "digest", "first", "last", "created_at")
# Columns added to tables of stores made before periods: (table, column, declaration).
_MIGRATIONS = (
    ("repayments", "reference", "TEXT"),
    ("gateways", "operator", "TEXT"),
    ("batches", "period", "INTEGER"),          # NULL while its records are live
    ("repayments", "folded", "INTEGER NOT NULL DEFAULT 0"),   # into the credit state
    # Of a charges chunk (NULL in the other carry rows): its earliest charge
    # time and its amounts added up, which a close chooses chunks by.
    ("carry", "first_time", "INTEGER"),
    ("carry", "amount", "INTEGER"),
    # Of a period: the repayments its close moved to its archive (folded
    # into the credit state), how many and their amounts added up.
    ("periods", "repayments", "INTEGER NOT NULL DEFAULT 0"),
    ("periods", "repaid", "INTEGER NOT NULL DEFAULT 0"),
    # Of a live batch whose tokens a closed period archived (a batch with
    # records scanned after that period's end): that period. NULL while
    # its row or a spooled part holds them.
    ("batches", "tokens_period", "INTEGER"),
)
DENY_DELTAS = 8   # deny-list versions a gateway may be behind and still get a delta
DEFAULT_HORIZON = 6 * 3600   # how late an upload is still checked exactly (docs: Periods)
UNASSIGNED = "unassigned"    # the operator of a gateway registered without one
# What the caller of each write must do when its commit failed: the outcome is
# unknown (the WAL can hold the commit, and a crash or reopen make it durable).
_RETRY_OPEN = "open the store again"
_RETRY_GATEWAY = "register the same key again: it is stored once"
_RETRY_INGEST = "ingest the same batch again: EXISTS if it was stored, APPLIED if not"
_RETRY_DENY = ("publish again and send only what that returns: a version this call may "
               "have stored was never sent, and every later one holds its serials")
_RETRY_REPAY = "record it again with the same reference: it is stored once"
_RETRY_TRUST = "trust the same key again: it is stored once"
_RETRY_SPOOL = "nothing: the tokens stay in the store, and the next part or close takes them"
_RETRY_CLOSE = ("close again with the same until: if this close is stored, that is "
                "PeriodClosed and period_report answers; if not, it closes now")
_SETTLEMENT_ROLES = Role.CREDENTIALS | Role.DENY_LIST   # what settlement checks keys for
# The carry is a row "carry" (tail and floor: what settling reads), this one
# (the credit state), and the charges not folded into it as one row per close
# that added them (a chunk, named _CHUNK + its period's number, zero-padded so
# names sort as periods do): a close reads and rewrites only the chunks that
# may hold a charge fallen due (_credit_fold). A chunk none of whose charges
# has folded yet holds no rows (_ARCHIVED): they are its period's `charged`
# table in the archive, so the live store keeps about a day of them, not
# due_after's worth. A store written before the chunks holds every charge in
# this row; its next close moves them to a chunk.
_CARRY_CREDIT = "credit"
_CHUNK = "charges:"
_CHUNKS = "name > 'charges:' AND name < 'charges;'"   # every chunk's name (':' + 1 is ';')
_ARCHIVED = b""   # a chunk's data when its rows are the archive's (a kept chunk is never empty)


# Live tokens are written to the archive's spool a part at a time, once this
# many rows have come since the last part (tokenspool.py): about 27 MB.
DEFAULT_TOKEN_PART_ROWS = 131_072

# The steps close_period reports to a progress callback.
CLOSE_STEPS = 3


class _Steps:
    """Calls progress(done, total, step) at each step of a long call: the
    step starting, with how many are done."""

    def __init__(self, progress: Callable[[int, int, str], None] | None,
                 total: int = CLOSE_STEPS) -> None:
        self.progress, self.total, self.done = progress, total, -1

    def __call__(self, step: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, step)


class IngestStatus(str, enum.Enum):
    APPLIED = "applied"     # new: stored, in one transaction
    EXISTS = "exists"       # the same batch again: nothing changed
    CONFLICT = "conflict"   # same (gateway, seq) or records, other content: nothing changed


@dataclass(frozen=True)
class IngestResult:
    status: IngestStatus
    gateway: str
    seq: int
    records: int
    invalid: int = 0   # records whose token failed re-verification


@dataclass(frozen=True)
class PeriodSummary:
    """A closed period: what it holds, and (from close_period) its clearing."""

    number: int
    from_time: int        # scans in [from_time, until)
    until: int
    closed_at: int
    records: int
    charged_total: int
    rejected_total: int   # not charged: invalid, repeated or flagged
    clearing: list[OperatorClearing]
    path: Path            # the period's archive folder


@dataclass(frozen=True)
class _Chunk:
    """The charges one close added and not folded yet: one carry row, `name`."""

    name: str
    charges: npt.NDArray[np.void]   # CHARGE_DTYPE, in the order they were added
    archived: bool = False          # all of its period's archived `charged` table


@dataclass
class _Holes:
    """Per gateway: the holes in its record numbers and the highest record
    number covered, the holes in its batch numbers and the highest batch."""

    by_gateway: dict[str, tuple[list[tuple[int, int]], int, list[tuple[int, int]], int]]

    def add(self, gateway: str, first: int, last: int, seq: int) -> None:
        records, top, batches, top_seq = self.by_gateway.get(gateway, ([], 0, [], 0))
        top = add_to_holes(records, top, first, last)
        top_seq = add_to_holes(batches, top_seq, seq, seq)
        self.by_gateway[gateway] = (records, top, batches, top_seq)

    def as_ranges(self) -> dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        return {g: (r, b) for g, (r, _t, b, _s) in self.by_gateway.items() if r or b}


class _Gaps(NamedTuple):
    """What _gaps keeps: the batches table's (count, highest arrival,
    arrival sum), the holes then, and their findings."""

    state: tuple[int, Any, int]
    holes: _Holes
    findings: list[Finding]

    def copy_holes(self) -> _Holes:
        return _Holes({g: (list(r), t, list(b), s)
                       for g, (r, t, b, s) in self.holes.by_gateway.items()})


class _Arrival(NamedTuple):
    """A live batch as _live reads it."""

    arrival: int
    rows: int
    gateway: str
    tokens: bool   # its row holds its tokens
    archived: bool   # a closed period holds its tokens (else, without tokens: a spooled part)


class _TokenPart(NamedTuple):
    """A registered part of the token spool (tokenspool.py)."""

    name: str
    first_arrival: int
    last_arrival: int
    written: archive_module.WrittenTable


class Settlement:
    """The settlement store with the registry of gateway keys and of the
    issuer keys it trusts to re-verify tokens. `store` is a directory (or
    `sqlite:///DIR`): an SQLite file in it, the embedded default; or
    `postgresql://USER@HOST/DB[?schema=NAME]` for several processes or
    machines on one database (storedb.py, pgstore.py), which needs `archive`
    (a folder every one of them reads: closed periods are written there).

    `self.trust` is the issuer keys stored in the store (`trust_issuer`)
    together with those of `trust`, which are used by this object only and
    never stored; a key in both is used as stored.

    The tokens of applied batches are written to the archive's spool as
    they come, `token_part_rows` at a time (archive_tokens, tokenspool.py),
    so that a close links them into its period instead of writing them."""

    def __init__(self, store: str | os.PathLike[str], trust: TrustStore | None = None,
                 gateways: Iterable[GatewayPublicKey] = (), *,
                 max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW,
                 threads: int = 1, horizon: int | None = None, due_after: int | None = None,
                 archive: str | os.PathLike[str] | None = None,
                 archive_format: str | None = None,
                 token_part_rows: int = DEFAULT_TOKEN_PART_ROWS) -> None:
        threads = _args.threads(threads)   # as verify_batch would at the first ingest
        token_part_rows = _args.integer("token_part_rows", token_part_rows, 1, 2**40)
        if horizon is not None:
            horizon = _args.integer("horizon", horizon, 0, U32_MAX)
        if due_after is not None:
            due_after = _args.integer("due_after", due_after, 0, 2**40 - 1)
        if archive_format is not None and (not isinstance(archive_format, str)
                                           or archive_format not in archive_module.FORMATS):
            raise InvalidArgument(f"archive_format is one of {archive_module.FORMATS}")
        if archive is not None and not isinstance(archive, (str, os.PathLike)):
            raise InvalidArgument(f"archive is a path, not {type(archive).__name__}")
        if trust is not None and not isinstance(trust, TrustStore):
            raise InvalidArgument(f"trust must be a TrustStore or None, not "
                                  f"{type(trust).__name__}")
        max_age, skew = _check_window(max_age, skew)
        if not isinstance(store, (str, os.PathLike)):
            raise InvalidArgument(f"store is a directory or a URL, not {type(store).__name__}")
        if storedb.is_postgres(store) and archive is None:
            raise InvalidArgument("a postgresql:// store needs archive=DIR (a folder every "
                                  "process on the store reads)")
        location = store if storedb.is_postgres(store) else storedb.sqlite_directory(store)
        gateways = _args.items("gateways", gateways)
        # Settlement's own store: the caller's keys are copied in (and the
        # stored ones added after the schema is there), so it never changes
        # a store the caller shares with gateways.
        self.trust = TrustStore(**({} if trust is None else {"cache_size": trust._cache_size}))
        for entry in trust or ():
            self.trust.add(entry.key, entry.not_before, entry.not_after, entry.roles)
        self.max_age = max_age
        self.skew = skew
        self.threads = threads
        self.archive = (Path(archive) if archive is not None
                        else storedb.sqlite_directory(store) / "archive")
        self.archive_format = archive_format
        self.token_part_rows = token_part_rows
        self._unspooled = 0   # rows this object applied since it last wrote a part
        self._lock = threading.RLock()  # one connection: calls take turns
        self._carry_cache: tuple[int, Carry, TailIndex] | None = None
        self._gaps_cache: _Gaps | None = None
        self._db: StoreDatabase = storedb.open_database(location)
        self.directory = self._db.directory   # the SQLite store's folder; None on PostgreSQL
        try:
            with self._write(_RETRY_OPEN) as db:
                for statement in self._db.schema(_SCHEMA):
                    db.execute(statement)
                for table, column, declaration in _MIGRATIONS:
                    if column not in self._db.columns(db, table):   # a store made before it
                        db.execute(self._db.schema(
                            f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")[0])
                for statement in self._db.schema(_INDEXES):
                    db.execute(statement)
            self._load_trust()
            self.horizon = self._setting("horizon", horizon, DEFAULT_HORIZON)
            self.due_after = self._setting("due_after", due_after, DEFAULT_DUE_AFTER)
        except BaseException:
            self._db.close()
            raise
        for key in gateways:
            self.register_gateway(key)

    @contextmanager
    def _write(self, retry: str) -> Iterator[Transaction]:
        """One write transaction, under the lock. A failure after the body ran
        is a failed COMMIT (say fdatasync returned EIO): rolled back here, yet
        its frames may be in the WAL, and a crash or a reopen can still make it
        durable. Its outcome is unknown, and the error says so and what to
        retry (`retry`)."""
        with self._lock:
            ran = False
            try:
                with self._db.transaction() as db:
                    yield db
                    ran = True
            except StoreUnavailable as exc:
                if not ran:
                    raise
                raise StoreUnavailable(f"{exc}: the commit failed and whether it is stored "
                                       f"is unknown; {retry}") from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        # The one connection is shared: a read must not see another thread's
        # transaction half-way.
        with self._lock:
            return self._db.query(sql, args)

    def close(self) -> None:
        with self._lock:   # not under another thread's call
            self._db.close()

    def __enter__(self) -> Settlement:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- issuer keys -------------------------------------------------------------------

    def trust_issuer(self, key: IssuerPublicKey | IssuerKey, not_before: int = 0,
                     not_after: int = U32_MAX, roles: Role = _SETTLEMENT_ROLES) -> TrustedKey:
        """Trust an issuer key from now on, in this store: every later
        `Settlement` on it re-verifies tokens with it (CREDENTIALS) and
        reloads deny lists signed with it (DENY_LIST). The same key again
        replaces its window and roles; another key with the same kid is
        InvalidArgument, and so are roles that name nothing."""
        entry = TrustStore().add(key, not_before, not_after, roles)   # the store's own checks
        public = entry.key.to_bytes()
        with self._write(_RETRY_TRUST) as db:
            row = db.execute("SELECT public FROM issuer_keys WHERE kid = ?",
                             (entry.kid,)).fetchone()
            if row is not None and row[0] != public:
                raise InvalidArgument(f"kid {entry.kid.hex()} already names another trusted key")
            db.execute("INSERT INTO issuer_keys(kid, public, not_before, not_after, roles) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kid) DO UPDATE SET "
                       "public = excluded.public, not_before = excluded.not_before, "
                       "not_after = excluded.not_after, roles = excluded.roles",
                       (entry.kid, public, entry.not_before, entry.not_after, int(entry.roles)))
        with self._lock:
            self._trust_entry(entry)
        return entry

    def trusted_issuers(self) -> list[TrustedKey]:
        """The issuer keys this store trusts (`trust_issuer`), by kid; not
        those only given to the constructor."""
        rows = self._query("SELECT public, not_before, not_after, roles FROM issuer_keys "
                           "ORDER BY kid")
        try:
            return [TrustedKey(IssuerPublicKey(bytes(public)), int(not_before), int(not_after),
                               Role(int(roles)))
                    for public, not_before, not_after, roles in rows]
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"settlement store: a trusted issuer key does not read back "
                                   f"({exc})") from exc

    def _load_trust(self) -> bool:
        """Add the stored issuer keys to self.trust; True if that changed it
        (a key another process trusted since this one opened, say)."""
        changed = False
        with self._lock:
            for entry in self.trusted_issuers():
                if entry.kid not in self.trust or self.trust.get(entry.kid) != entry:
                    self._trust_entry(entry)
                    changed = True
        return changed

    def _trust_entry(self, entry: TrustedKey) -> None:
        if entry.kid in self.trust and self.trust.get(entry.kid).key != entry.key:
            self.trust.remove(entry.kid)   # the stored key wins over the caller's
        self.trust.add(entry.key, entry.not_before, entry.not_after, entry.roles)

    # -- gateways ----------------------------------------------------------------------

    def register_gateway(self, key: GatewayPublicKey, operator: str | None = None) -> str:
        """Register a gateway's key, and with `operator` the operator its
        payments are cleared to (given again, it moves the gateway to that
        operator from the next close on)."""
        if not isinstance(key, GatewayPublicKey):
            raise InvalidArgument("gateways are registered by their GatewayPublicKey")
        if operator is not None and (not isinstance(operator, str)
                                     or not clearing.OPERATOR_ID.fullmatch(operator)):
            raise InvalidArgument("an operator id is 1 to 64 ASCII letters, digits and ._:- "
                                  "(not starting with a sign)")
        gateway_id = key.gateway_id
        with self._write(_RETRY_GATEWAY) as db:
            row = db.execute("SELECT public FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is not None and row[0] != key.to_bytes():
                raise InvalidArgument(f"gateway id {gateway_id} already names another key")
            if row is None:
                db.execute("INSERT INTO gateways(id, public, operator) VALUES (?, ?, ?)",
                           (gateway_id, key.to_bytes(), operator))
            elif operator is not None:
                db.execute("UPDATE gateways SET operator = ? WHERE id = ?",
                           (operator, gateway_id))
        return gateway_id

    def _gateway_key(self, public: bytes) -> tuple[str, GatewayPublicKey]:
        if len(public) != PUBLIC_KEY_LEN:
            raise MalformedMessage("gateway key is 32 bytes")
        rows = self._query("SELECT id FROM gateways WHERE public = ?", (public,))
        if not rows:
            raise UnknownGateway("batch from a gateway that is not registered")
        return rows[0][0], GatewayPublicKey(public)

    # -- ingest ------------------------------------------------------------------------

    def ingest(self, data: bytes) -> IngestResult:
        """Apply one signed upload batch. Raises MalformedMessage,
        UnknownGateway or BadSignature for a batch that is rejected whole."""
        body, signature = split_document(data)
        doc = body_map(body, _BATCH_FIELDS, max_array=MAX_RECORDS_PER_BATCH, max_bin=4096)
        if doc["v"] != 1:
            raise MalformedMessage(f"unsupported batch format {doc['v']}")
        gateway_id, gateway_key = self._gateway_key(doc["gateway"])
        verify_document(gateway_key, TAG_BATCH, body, signature)
        seq, first, last = doc["seq"], doc["first"], doc["last"]
        for name in ("seq", "first", "last", "created_at"):
            if not 0 <= doc[name] < 2**53:
                raise MalformedMessage(f"batch {name} out of range")
        if seq < 1:
            raise MalformedMessage("batch seq starts at 1")
        records, tokens, lengths = _parse_records(doc["records"], first, last)
        digest = hashlib.blake2b(body, digest_size=32).digest()
        known = self._status(gateway_id, seq, first, last, digest)
        if known is not None:  # cheap answer for retries, before any verifying
            return IngestResult(known, gateway_id, seq, len(records))

        # A gateway can be compromised: every token is verified again, at the
        # time the gateway says it scanned it.
        checked = self._verify(tokens, records, lengths)
        fields = tokens.view(TOKEN_DTYPE).reshape(-1)
        unknown = checked.reasons == Reason.UNKNOWN_KID
        if unknown.any() and self._load_trust():    # a key trusted since this store opened
            checked = self._verify(tokens, records, lengths)
            unknown = checked.reasons == Reason.UNKNOWN_KID
        if unknown.any():
            # Settlement lacks a key the gateway trusted: storing these records
            # as invalid would lose their charges for good (the batch would be
            # EXISTS from then on). Refused whole; the gateway keeps the batch.
            kids = sorted({int(k) for k in fields["kid"][unknown].tolist()})
            raise UnknownKeyId(
                f"batch {seq} of gateway {gateway_id}: {int(unknown.sum())} of {len(records)} "
                f"records hold tokens of an issuer key settlement does not trust (kid "
                f"{', '.join(k.to_bytes(4, 'little').hex() for k in kids[:5])}); nothing is "
                "stored. Trust the key (qrpay settlement trust, Settlement.trust_issuer) and "
                "ingest the batch again")
        reasons = checked.reasons.copy()
        valid = reasons == Reason.OK
        reasons[valid & (fields["scene"] != records["scene"])] = Reason.SCENE_MISMATCH
        records["reason"] = reasons
        for name in ("serial", "counter", "account", "issued_at", "limit"):
            records[name] = fields[name]
        records["token_id"] = tokens[:, TOKEN_DEVICE_SIG:TOKEN_DEVICE_SIG + 8].copy().view(
            "<u8").reshape(-1)
        # The gateway stops counting these against the offline limit once exported.
        records["uploaded_at"] = min(doc["created_at"], U32_MAX)
        with self._write(_RETRY_INGEST) as db:
            # Checked again inside the write transaction: another caller may
            # have applied this batch (or an overlapping one) meanwhile.
            known = self._status(gateway_id, seq, first, last, digest)
            if known is not None:
                return IngestResult(known, gateway_id, seq, len(records))
            db.execute(
                "INSERT INTO batches(gateway, seq, digest, first, last, created_at, "
                "records, tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (gateway_id, seq, digest, first, last, doc["created_at"],
                 records.tobytes(), tokens.tobytes()))
        self._after_ingest(len(records))
        return IngestResult(IngestStatus.APPLIED, gateway_id, seq, len(records),
                            int(np.count_nonzero(reasons != Reason.OK)))

    def _after_ingest(self, rows: int) -> None:
        """Write a token part once enough rows came. The batch is stored
        (the caller answers APPLIED whatever happens here): a part that
        cannot be written now is written by a later one, or by the close."""
        self._unspooled += rows
        if self._unspooled < self.token_part_rows:
            return
        try:
            self.archive_tokens(wait=False)
        except Exception as exc:   # noqa: BLE001 - any: the answer must stay APPLIED
            self._unspooled = 0   # tried again after as many rows, not at every batch
            _log.warning("token part not written (a later one or the close will write "
                         "them): %s: %s", type(exc).__name__, exc)

    def archive_tokens(self, wait: bool = True) -> int:
        """Write the tokens of the live batches that still hold theirs to the
        archive's spool as one part, and drop them from the store: the next
        close links the part into its period. Returns how many tokens were
        written (0 with none to write; 0 too without `wait` while a close
        or another part holds the store's close lock). ingest calls it
        every `token_part_rows` rows; a service may also call it when idle."""
        with self._lock, self._db.exclusive(CLOSE_LOCK, wait=wait) as held:
            if not held:
                return 0
            self._unspooled = 0
            parts = self._token_parts()
            tokenspool.sweep(self.archive, {part.name for part in parts})
            rows = self._query("SELECT arrival, gateway, records, tokens FROM batches WHERE "
                               "period IS NULL AND length(tokens) > 0 ORDER BY arrival")
            if not rows:
                return 0
            parts_of = [np.frombuffer(r[2], dtype=RECORD_DTYPE) for r in rows]
            if any(len(r[3]) != len(p) * TOKEN_LEN for r, p in zip(rows, parts_of)):
                raise StoreUnavailable(_DAMAGED_TOKENS)
            records = _joined(parts_of)
            arrivals = [_Arrival(int(r[0]), len(p), str(r[1]), True, False)
                        for r, p in zip(rows, parts_of)]
            tokens = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.uint8).reshape(
                -1, TOKEN_LEN)
            name, table = _tokens_table(arrivals, records, tokens)
            written = tokenspool.write_part(self.archive, name, table, self.archive_format)
            with self._write(_RETRY_SPOOL) as db:
                db.execute("INSERT INTO token_parts(name, first_arrival, last_arrival, rows, "
                           "written) VALUES (?, ?, ?, ?, ?)",
                           (name, arrivals[0].arrival, arrivals[-1].arrival, len(records),
                            written.to_bytes()))
                _empty_tokens(db, [a.arrival for a in arrivals])
            return len(records)

    def _token_parts(self) -> list[_TokenPart]:
        """The registered parts of the spool, in arrival order."""
        return [_TokenPart(str(r[0]), int(r[1]), int(r[2]),
                           archive_module.WrittenTable.from_bytes(bytes(r[3])))
                for r in self._query("SELECT name, first_arrival, last_arrival, written "
                                     "FROM token_parts ORDER BY first_arrival")]

    def _verify(self, tokens: npt.NDArray[np.uint8], records: npt.NDArray[np.void],
                lengths: npt.NDArray[np.int64]) -> BatchResult:
        return verify_batch(tokens, self.trust, records["gateway_time"].astype(np.int64),
                            max_age=self.max_age, skew=self.skew, threads=self.threads,
                            lengths=lengths)

    def _status(self, gateway_id: str, seq: int, first: int, last: int,
                digest: bytes) -> IngestStatus | None:
        """EXISTS or CONFLICT if (gateway, seq) or its record range is taken.
        One statement: read in two, another process's batch committed between
        them would make this batch's own copy look like an overlap."""
        rows = self._query("SELECT seq, digest FROM batches WHERE gateway = ? AND "
                           "(seq = ? OR (first <= ? AND last >= ?))",
                           (gateway_id, seq, last, first))
        for stored_seq, stored_digest in rows:
            if stored_seq == seq:
                return (IngestStatus.EXISTS if bytes(stored_digest) == digest
                        else IngestStatus.CONFLICT)
        # The same record numbers under another batch number.
        return IngestStatus.CONFLICT if rows else None

    def _setting(self, name: str, given: int | None, default: int) -> int:
        """A setting every period of the store must share (horizon,
        due_after): the one stored once a period closed, else `given`."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (name,))
        if not rows:
            return default if given is None else given
        stored = int(rows[0][0])
        if given is not None and given != stored:
            raise InvalidArgument(f"this store closed its periods with {name} = {stored}, "
                                  f"not {given}")
        return stored

    # -- the open period -----------------------------------------------------------------

    def _live(self, tokens: bool = False, room: int = 0) -> tuple[
            npt.NDArray[np.void], npt.NDArray[np.object_], npt.NDArray[np.uint8],
            list[_Arrival]]:
        """The records not in a closed period, in arrival order, with the
        gateway of each; with `tokens`, the tokens the batches still hold
        (one TOKEN_LEN row each, for the batches whose tokens are not in a
        spooled part; else no rows); and each live batch's (arrival, rows,
        gateway, holds its tokens). The records are the end of an array with
        `room` free rows before them (periods.with_room; the array is their
        `base`)."""
        columns = "arrival, gateway, records" + (
            ", tokens, tokens_period IS NOT NULL" if tokens else "")
        # A batch of a closed period has a period and no records (batches_live).
        rows = self._query(f"SELECT {columns} FROM batches WHERE period IS NULL AND "
                           "length(records) > 0 "
                           "ORDER BY arrival")
        parts = [np.frombuffer(r[2], dtype=RECORD_DTYPE) for r in rows]
        records = _joined(parts, room)
        names = np.array([r[1] for r in rows], dtype=object)
        gateway = (np.repeat(names, [len(p) for p in parts]) if parts
                   else np.zeros(0, dtype=object))
        # One join, not a Python step per batch: a close reads them while
        # other threads work.
        token_rows = np.zeros((0, TOKEN_LEN), dtype=np.uint8)
        if tokens:
            joined = b"".join(r[3] for r in rows)
            # No tokens: they are in a spooled part (checked by the close).
            if any(len(r[3]) not in (0, len(p) * TOKEN_LEN) for r, p in zip(rows, parts)):
                raise StoreUnavailable(_DAMAGED_TOKENS)
            token_rows = np.frombuffer(joined, dtype=np.uint8).reshape(-1, TOKEN_LEN)
        return records, gateway, token_rows, [
            _Arrival(int(r[0]), len(p), str(r[1]), bool(tokens and len(r[3])),
                     bool(tokens and r[4]))
            for r, p in zip(rows, parts)]

    def _gaps(self, full: bool = False) -> list[Finding]:
        """reports.gap_findings over every batch ever applied: the batches
        of every closed period stay in the table. Rows are only ever added,
        each above the last (writers take turns; a close writes the rows it
        empties back with their arrival), so the ones that came since the
        last look are those above its highest arrival: a report reads only
        them (a day's batches in milliseconds, whatever the history) and
        folds them into the holes kept, after checking that the highest row
        it knew is still there. With `full` (a close), the count and sum of
        every arrival are checked too (O(history): 11 ms after a month),
        and any difference finds the holes again by SQL over every batch
        (0.1 s or more after a month)."""
        cached = self._gaps_cache
        if cached is not None and cached.state[1] is not None and not full:
            count, top, total = cached.state
            added = self._query("SELECT arrival, gateway, first, last, seq FROM batches "
                                "WHERE arrival > ? ORDER BY arrival", (top,))
            (highest,) = self._query("SELECT MAX(arrival) FROM batches")[0]
            if highest == (added[-1][0] if added else top):
                if not added:
                    return list(cached.findings)
                state = (count + len(added), int(added[-1][0]),
                         total + sum(int(row[0]) for row in added))
                return self._fold_gaps(cached.copy_holes(), added, state)
        (state,) = self._query("SELECT COUNT(*), MAX(arrival), COALESCE(SUM(arrival), 0) "
                               "FROM batches")
        count, top, total = int(state[0]), state[1], int(state[2])
        if cached is not None and cached.state == (count, top, total):
            return list(cached.findings)
        if cached is not None and cached.state[1] is not None:
            added = self._query("SELECT arrival, gateway, first, last, seq FROM batches "
                                "WHERE arrival > ?", (cached.state[1],))
            if (cached.state[0] + len(added) == count
                    and cached.state[2] + sum(int(row[0]) for row in added) == total):
                return self._fold_gaps(cached.copy_holes(), added, (count, top, total))
        return self._fold_gaps(self._all_holes(), [], (count, top, total))

    def _fold_gaps(self, holes: _Holes, added: list[Any], state: tuple[int, Any, int]
                   ) -> list[Finding]:
        """The findings of `holes` with the `added` batch rows folded in,
        kept with the batches table's `state` (count, highest arrival, sum)."""
        for _arrival, gateway, first, last, seq in added:
            holes.add(str(gateway), int(first), int(last), int(seq))
        findings = holes_as_findings(holes.as_ranges())
        self._gaps_cache = _Gaps(state, holes, findings)
        return list(findings)

    def _all_holes(self) -> _Holes:
        """Every gateway's holes in record numbers and batch numbers, found
        by SQL over every batch, with the highest of each."""
        holes = _Holes({})
        for gateway, last, seq in self._query("SELECT gateway, MAX(last), MAX(seq) FROM batches "
                                              "GROUP BY gateway"):
            holes.by_gateway[str(gateway)] = ([], int(last), [], int(seq))
        for at, sql in enumerate((
                # Records: a batch starting past every range before it (by first, last).
                "SELECT gateway, covered + 1, first - 1 FROM (SELECT gateway, first, "
                "COALESCE(MAX(last) OVER (PARTITION BY gateway ORDER BY first, last ROWS "
                "BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS covered FROM batches) AS r "
                "WHERE first > covered + 1 ORDER BY gateway, first",
                # Batch numbers (unique per gateway): one past the number before it.
                "SELECT gateway, before + 1, seq - 1 FROM (SELECT gateway, seq, "
                "COALESCE(LAG(seq) OVER (PARTITION BY gateway ORDER BY seq), 0) AS before "
                "FROM batches) AS b WHERE seq > before + 1 ORDER BY gateway, seq")):
            for gateway, start, end in self._query(sql):
                records, _top, batches, _top_seq = holes.by_gateway[str(gateway)]
                (batches if at else records).append((int(start), int(end)))
        return holes

    def _carry(self, credit: bool = True, chunks: bool = True) -> Carry:
        """The carried state. Without `credit`, its charges and credit state
        are left out (empty): settling needs the tail and the floor only, and
        the charges are about due_after's worth of days (docs: Periods).
        Without `chunks`, the charges stored per close are left out (a close
        reads only the due ones: _fold_credit); charges a store kept in one
        row before the chunks are in either way."""
        names = ("carry", _CARRY_CREDIT) if credit else ("carry",)
        chunked = f" OR ({_CHUNKS})" if credit and chunks else ""
        tables: dict[str, Table] = {}
        charges: list[npt.NDArray[np.void]] = []
        # One statement: the rows of one moment. Sorted here, chunks in the
        # order they were added: SQLite's ORDER BY would copy every blob.
        rows = self._query("SELECT name, data FROM carry WHERE name IN "
                           f"({','.join('?' * len(names))}){chunked}", names)
        for name, data in sorted(rows, key=lambda row: str(row[0])):
            if str(name).startswith(_CHUNK):
                charges.append(self._chunk_charges(str(name), data))
            else:
                tables.update(unpack_tables(data, widen=False))   # before the split: one row
        if "carry_tail" not in tables:
            return Carry.empty()
        if "carry_charges" in tables:   # kept in one row before the chunks: the oldest
            charges.insert(0, charges_from_table(tables["carry_charges"]))
        tables["carry_charges"] = charges_table(
            np.concatenate(charges) if charges else np.zeros(0, dtype=CHARGE_DTYPE))
        return Carry.from_tables(tables)

    def _chunked_amount(self) -> int:
        """The amounts of every chunk's charges added up: from the index, no
        chunk is read (and in Python: SQLite's SUM stops at 2**63)."""
        return sum(int(amount) for (amount,) in self._query(
            f"SELECT amount FROM carry WHERE {_CHUNKS}"))

    def _read_chunks(self, before: int | None) -> list[_Chunk]:
        """The chunks that hold a charge scanned before `before` (every chunk
        for None), in the order they were added."""
        rows = self._query(f"SELECT name, data FROM carry WHERE {_CHUNKS} AND first_time < ? "
                           "ORDER BY name", (2**63 - 1 if before is None else before,))
        return [_Chunk(str(name), self._chunk_charges(str(name), data), data == _ARCHIVED)
                for name, data in rows]

    def _chunk_charges(self, name: str, data: bytes) -> npt.NDArray[np.void]:
        """A chunk's charges: its rows, or its period's archived ones."""
        if data != _ARCHIVED:
            return charges_from_table(unpack_tables(data, widen=False)["carry_charges"])
        number = int(name[len(_CHUNK):])
        tables, _summary = archive_module.read_period(self.archive, number, ["charged"])
        return charges_from_table(tables["charged"])

    def _open_period(self) -> tuple[int, int]:
        """(number, from_time) of the open period."""
        rows = self._query("SELECT number, until FROM periods ORDER BY number DESC LIMIT 1")
        return (int(rows[0][0]) + 1, int(rows[0][1])) if rows else (1, 0)

    @property
    def _slack(self) -> int:
        return self.max_age + 2 * self.skew

    def report(self) -> Report:
        """Charges and findings of the open period: every record ingested and
        not yet in a closed period, settled after the closed ones."""
        with self._lock:   # records and carry of one moment
            number, from_time = self._open_period()
            carry, index = self._settling_carry(number)
            # Room for the tail rows the records need before them (no copy).
            records, gateway, _t, _a = self._live(room=len(carry.tail))
            gaps = self._gaps()
        settled = settle_period(carry, records, gateway, self._slack, index, room=records.base)
        return build_report(settled, [], self.horizon, period=number, from_time=from_time,
                            gaps=gaps)

    def _settling_carry(self, number: int) -> tuple[Carry, TailIndex]:
        """The tail and floor the open period `number` settles after, and
        their index: read and worked out once while that period is open (a
        close in any process opens the next one)."""
        if self._carry_cache is None or self._carry_cache[0] != number:
            carry = self._carry(credit=False)
            self._carry_cache = (number, carry, index_tail(carry))
        return self._carry_cache[1], self._carry_cache[2]

    def _cached_index(self, number: int) -> TailIndex | None:
        """The tail's index, if a report() of open period `number` worked it
        out (a close settles after the same tail)."""
        cached = self._carry_cache
        return cached[2] if cached is not None and cached[0] == number else None

    # -- periods -------------------------------------------------------------------------

    def close_period(self, until: int, key: SettlementKey, *, now: int | None = None,
                     progress: Callable[[int, int, str], None] | None = None
                     ) -> PeriodSummary:
        """Close the open period at `until`: settle every record scanned
        before it that has arrived, after the closed periods; archive those
        records with the report, the clearing and a statement per operator
        signed with `key`; carry forward what the next period needs; and
        remove them from the live store. See docs/SETTLEMENT.md (Periods).
        `progress(done, total, step)` hears of each of its CLOSE_STEPS."""
        step = _Steps(progress)
        if not isinstance(key, SettlementKey):
            raise InvalidKey("a period is signed with a SettlementKey")
        until = _args.integer("until", until, 1, U32_MAX)
        closed_at = _args.integer("now", int(time.time()) if now is None else now, 0, U32_MAX)
        with self._lock, self._closing():
            number, from_time = self._open_period()
            if until <= from_time:
                raise PeriodClosed(f"until {until} is not after the last close ({from_time}); "
                                   "nothing changed")
            if closed_at < until:
                raise InvalidArgument(f"a period is closed after its end: now {closed_at} is "
                                      f"before until {until}")
            schedule = self.fee_schedule(from_time)
            if schedule is None:
                raise InvalidArgument(f"no fee schedule in force at {from_time}: set one with "
                                      "set_fee_schedule (or qrpay settlement fees)")
            step("reading the live records")
            records, gateway, tokens, arrivals = self._live(tokens=True)
            parts = self._token_parts()
            _check_spooled(arrivals, parts)
            step("settling and archiving the period")
            inside = records["gateway_time"] < until
            carry = self._carry(chunks=False)   # the fold reads the chunks it needs
            # The closing records with room before them for the tail rows they need.
            room, closing = with_room(int(np.count_nonzero(inside)), len(carry.tail))
            np.compress(inside, records, out=closing)
            closing_gateway = gateway[inside]
            archived_gateway = _gateway_labels(arrivals, inside)
            with self._period_writer(number) as writer, ThreadPoolExecutor(
                    4, thread_name_prefix="qrpay-close") as pool:
                # The records and tokens are written while they are settled;
                # the credit state is folded, the carry worked out, the other
                # tables written, the records hashed and the carry packed
                # while the report is worked out (numpy, pyarrow, zlib and
                # hashlib let go of the GIL in each).
                written = [pool.submit(writer.add, "records",
                                       _records_table(closing, archived_gateway))]
                # Every live batch's tokens go with this period: those spooled
                # are linked in, the rest written now.
                for part in parts:
                    writer.adopt(part.written, tokenspool.spool_dir(self.archive) / part.name)
                if len(tokens):
                    written.append(pool.submit(lambda: writer.add(*_tokens_table(
                        arrivals, records, tokens))))
                settled = settle_period(carry, closing, closing_gateway, self._slack,
                                        self._cached_index(number), room=room)
                # One read: a repayment stored meanwhile is left to the next close.
                paid, moved = self._live_repayments(until - self.horizon)
                folding = pool.submit(self._credit_fold(
                    carry, period_charges(settled), paid, until - self.horizon, number, writer))
                # Its charges go to the chunks (the fold), not into the carry.
                forwarding = pool.submit(carry_forward, carry, settled, until - self.horizon,
                                         self.due_after, with_charges=False)
                written.append(pool.submit(writer.add, "repayments", moved))
                digest = pool.submit(_records_digest, settled)
                report = build_report(settled, [], self.horizon, period=number,
                                      from_time=from_time, until=until,
                                      gaps=self._gaps(full=True))
                clearings = self._clearing(settled, schedule)
                statements = [clearing.sign_statement(key, Statement.from_clearing(
                    c, period=number, from_time=from_time, until=until, schedule=schedule,
                    issued_at=closed_at)) for c in clearings]
                written.extend(pool.submit(writer.add, name, table) for name, table in
                               _period_tables(settled, report, clearings, statements,
                                              carry).items())
                packing = pool.submit(_tail_row, forwarding.result())
                state, (emptied, chunk_rows) = folding.result()
                credit_row = _credit_row(state)   # while the tail is packed
                summary = self._summary(key, report, clearings, digest.result(), closed_at)
                for table_written in written:
                    table_written.result()
                writer.commit(summary)
                carry_rows = [packing.result(), credit_row]
            flagged = report.flagged_serials()
            step("committing the close")
            with self._write(_RETRY_CLOSE) as db:
                db.execute("INSERT INTO periods(number, from_time, until, closed_at, records, "
                           "charged_total, rejected_total, summary) VALUES (?,?,?,?,?,?,?,?)",
                           (number, from_time, until, closed_at, report.records,
                            report.charged_total, report.rejected_total, summary))
                db.executemany("INSERT INTO carry(name, data) VALUES (?, ?) ON CONFLICT (name) "
                               "DO UPDATE SET data = excluded.data", carry_rows)
                db.executemany("DELETE FROM carry WHERE name = ?", emptied)
                db.executemany("INSERT INTO carry(name, data, first_time, amount) "
                               "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                               "data = excluded.data, first_time = excluded.first_time, "
                               "amount = excluded.amount", chunk_rows)
                for name, value in (("horizon", self.horizon), ("due_after", self.due_after)):
                    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING", (name, str(value).encode()))
                db.executemany("INSERT INTO flagged(serial, period) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING",
                               [(int(s) if s < 2**63 else int(s) - 2**64, number)
                                for s in flagged])
                self._move_repayments(db, moved, number, until - self.horizon)
                self._keep_deferred(db, records, arrivals, inside, number)
                db.executemany("DELETE FROM token_parts WHERE name = ?",
                               [(part.name,) for part in parts])
            # Its parts are the period's now; anything else there is what a
            # killed part left (no part can be written while a close runs).
            tokenspool.sweep(self.archive, set())
            self._unspooled = 0
            self._db.compact()
        step("closed")
        return PeriodSummary(number, from_time, until, closed_at, report.records,
                             report.charged_total, report.rejected_total, clearings,
                             archive_module.period_dir(self.archive, number))

    def _live_repayments(self, cut: int) -> tuple[npt.NDArray[np.int64], archive_module.Table]:
        """The repayments not folded into the credit state yet, as (account,
        amount, paid_at) rows; and those this close folds (before `cut`, and
        any a store from before this kept, folded), which move to the
        period's archive, as its table."""
        every = self._query("SELECT id, account, amount, paid_at, reference, folded "
                            "FROM repayments ORDER BY id")
        paid = np.array([row[1:4] for row in every if not row[5]], dtype=np.int64).reshape(-1, 3)
        rows = [row for row in every if row[5] or row[3] < cut]
        reference = np.empty(len(rows), dtype=object)
        reference[:] = ["" if row[4] is None else str(row[4]) for row in rows]
        table: archive_module.Table = {
            name: np.array([row[i] for row in rows], dtype=np.int64)
            for i, name in enumerate(("id", "account", "amount", "paid_at"))}
        table["account"] = table["account"].astype(np.uint64)
        table["reference"] = reference    # "" for a row stored before references
        return paid, table

    def _move_repayments(self, db: Transaction, moved: archive_module.Table,
                         number: int, cut: int) -> None:
        """Delete the repayments archived with period `number` (those
        _live_repayments read folded or before `cut`: one stored meanwhile
        has a higher id and is folded by the next close), keeping a hash of
        each reference so that it is still stored once (_insert_repayments)."""
        ids = moved["id"].tolist()
        where = "id <= ? AND (folded != 0 OR paid_at < ?)"
        bounds = (max(ids, default=0), cut)
        # One statement: the rows it names are those read (ids only grow,
        # and a repayment row never changes), which the count checks.
        found = db.execute(f"SELECT COUNT(*) FROM repayments WHERE {where}",
                           bounds).fetchall()[0][0]
        if found != len(ids):
            raise StoreUnavailable(f"settlement store: {found} repayments to move, not the "
                                   f"{len(ids)} read (the store changed under the close); "
                                   "nothing closed")
        db.execute(f"DELETE FROM repayments WHERE {where}", bounds)
        db.executemany("INSERT INTO repayment_refs(hash, period) VALUES (?, ?) "
                       "ON CONFLICT DO NOTHING",
                       [(_reference_hash(str(r)), number) for r in moved["reference"] if r])
        db.execute("UPDATE periods SET repayments = ?, repaid = ? WHERE number = ?",
                   (len(ids), int(moved["amount"].sum()), number))

    @contextmanager
    def _closing(self) -> Iterator[None]:
        """One close at a time per store, across processes (a second waits
        for the first): a close replaces an archive folder no committed
        period names, which must not be another process's close in flight."""
        with self._db.exclusive(CLOSE_LOCK):
            yield

    def _clearing(self, settled: Settled, schedule: FeeSchedule) -> list[OperatorClearing]:
        """Per operator: the period's charged payments by scene, the fee and
        the net; the valid ones not charged listed apart."""
        records = settled.records[settled.new]
        owners = self.operators()
        # Per gateway, not per record: settled.gateway indexes settled.names.
        present = np.unique(settled.gateway[settled.new]).tolist()
        names = sorted(set(owners.values()) | {owners.get(settled.names[g], UNASSIGNED)
                                               for g in present} | {UNASSIGNED})
        index = {name: i for i, name in enumerate(names)}
        of_gateway = np.array([index[owners.get(g, UNASSIGNED)] for g in settled.names],
                              dtype=np.int64)
        at = of_gateway[settled.gateway[settled.new]]
        charged = settled.result.charged[settled.new]
        clearings = clearing.clear(records["amount"][charged], records["scene"][charged],
                                   at[charged], names, schedule,
                                   flagged_amount=records["amount"][~charged],
                                   flagged_scene=records["scene"][~charged],
                                   flagged_operator=at[~charged])
        total = int(records["amount"][charged].astype(np.int64).sum())
        clearing.check_invariants(total, clearings, total_flagged=int(
            records["amount"][~charged].astype(np.int64).sum()))
        return clearings

    def _credit_fold(self, carry: Carry, charges: npt.NDArray[np.void],
                     paid: npt.NDArray[np.int64], cut: int, number: int,
                     writer: archive_module.PeriodWriter
                     ) -> Callable[[], tuple[npt.NDArray[np.void] | None, _ChunkRows]]:
        """The fold of the charges and repayments no later row can change
        into the carried credit state (credit.freeze), as a call to run in
        another thread: what it needs of the store is read here. `charges`
        are the closing period `number`'s, which the call archives as its
        `charged` table (with `carry.charges`, any kept in one row before the
        chunks, they make its chunk) and `paid` the repayments not folded yet
        (_live_repayments); of the stored chunks, only those that
        may hold a charge fallen due are read. The call returns the new state
        and the chunk rows to write (_chunk_rows): the period's and every one
        that lost rows, with the rows kept."""
        state = carry.credit
        if state is not None and len(state):
            cut = max(cut, int(state["cut"][0]))
            paid = paid.copy()
            paid[:, 2] = np.maximum(paid[:, 2], int(state["cut"][0]))
        name = f"{_CHUNK}{number:010d}"
        # Only a charge fallen due before the cut can fold, and every other
        # charge of its account is later in its FIFO order: without them
        # freeze decides the same and sorts about a day of charges, not
        # due_after's worth. (All of them when freeze would refuse the sums.)
        line = cut - self.due_after
        every = _near_total_limit(self._chunked_amount() + int(carry.charges["amount"].sum())
                                  + int(charges["amount"].sum()), state)
        stored = self._read_chunks(None if every else line)

        def fold() -> tuple[npt.NDArray[np.void] | None, _ChunkRows]:
            # By account, then time: the order freeze wants them in, so that
            # the close in which they fall due finds them sorted.
            ordered = _by_account_then_time(charges)
            writer.add("charged", charges_table(ordered))
            new = _Chunk(name, np.concatenate([carry.charges, ordered]),
                         archived=not len(carry.charges))
            both = np.concatenate([chunk.charges for chunk in (*stored, new)])
            rows = np.arange(len(both)) if every else np.flatnonzero(both["time"] < line)
            folded, kept, _paid = credit.freeze(
                both["account"][rows], both["time"][rows], both["amount"][rows],
                paid[:, 0], paid[:, 2], paid[:, 1], cut, self.due_after, state=state)
            keep = np.ones(len(both), dtype=np.bool_)
            keep[rows[~kept]] = False
            return folded, _chunk_rows(_kept(stored, new, keep))
        return fold

    def _summary(self, key: SettlementKey, report: Report, clearings: list[OperatorClearing],
                 records_digest: bytes, closed_at: int) -> bytes:
        """The period's signed summary: what it holds and what it cleared."""
        return sign_document(key, TAG_PERIOD, {
            "v": 1, "period": report.period, "from": report.from_time, "until": report.until,
            "closed_at": closed_at, "records": report.records,
            "charged_total": report.charged_total, "rejected_total": report.rejected_total,
            "accounts": len(report.accounts),
            "findings": {kind: len(report.of_kind(kind)) for kind in sorted(
                {f.kind for f in report.findings})},
            "operators": [[c.operator, c.gross, c.fee, c.net, c.flagged_amount]
                          for c in clearings],
            "records_digest": records_digest,
        })

    def _period_writer(self, number: int) -> archive_module.PeriodWriter:
        """The writer of the period's folder, written before the store
        commits it. A folder left by a close that crashed before its commit
        is replaced."""
        folder = archive_module.period_dir(self.archive, number)
        if folder.exists():
            shutil.rmtree(folder)   # not committed: no period row names it
        return archive_module.PeriodWriter(self.archive, number, format=self.archive_format)

    def _keep_deferred(self, db: Transaction, records: npt.NDArray[np.void],
                       arrivals: list[_Arrival], inside: npt.NDArray[np.bool_],
                       number: int) -> None:
        """Empty the live batches of the records just archived; a batch with
        records scanned at or after the cut keeps those. Every one's tokens
        went with the period (they are archived by arrival), which a batch
        that stays notes in its row (tokens_period)."""
        at, emptied, partial, staying = 0, [], [], []
        for arrival, count, _gateway, _tokens, archived in arrivals:
            mine = inside[at:at + count]
            if mine.all():
                emptied.append(arrival)
            else:
                if mine.any():
                    partial.append((records[at:at + count][~mine].tobytes(), arrival))
                if not archived:
                    staying.append(arrival)
            at += count
        # Emptied in place, a row would keep the b-tree page its blobs filled
        # (SQLite merges pages on delete, not on update), and the table would
        # grow by a page per batch ever applied: delete it, insert it again.
        kept = list(_BATCH_KEYS)
        insert = (f"INSERT INTO batches({', '.join(kept)}, records, tokens, period) "
                  f"VALUES ({', '.join(['?'] * (len(kept) + 3))})")
        for start in range(0, len(emptied), 500):   # within SQLite's bound on parameters
            chunk = emptied[start:start + 500]
            where = f"arrival IN ({','.join('?' * len(chunk))})"
            rows = db.execute(f"SELECT {', '.join(kept)} FROM batches WHERE {where}",
                              chunk).fetchall()
            db.execute(f"DELETE FROM batches WHERE {where}", chunk)
            db.executemany(insert, [(*row, b"", b"", number) for row in rows])
        db.executemany("UPDATE batches SET records = ? WHERE arrival = ?", partial)
        _empty_tokens(db, staying, number)

    def periods(self) -> list[PeriodSummary]:
        """The closed periods, oldest first (clearing read from the archive
        only by period_report / statement)."""
        rows = self._query("SELECT number, from_time, until, closed_at, records, "
                           "charged_total, rejected_total FROM periods ORDER BY number")
        return [PeriodSummary(int(n), int(f), int(u), int(c), int(r), int(ch), int(rj), [],
                              archive_module.period_dir(self.archive, int(n)))
                for n, f, u, c, r, ch, rj in rows]

    def _period_row(self, number: int) -> tuple[int, ...]:
        number = _args.integer("number", number, 1, 2**62)
        rows = self._query("SELECT from_time, until, records, rejected_total FROM periods "
                           "WHERE number = ?", (number,))
        if not rows:
            raise InvalidArgument(f"period {number} is not closed")
        return tuple(int(v) for v in rows[0])

    def period_report(self, number: int) -> Report:
        """The report of closed period `number`, read from its archive."""
        from_time, until, records, rejected = self._period_row(number)
        tables, _summary = archive_module.read_period(self.archive, number,
                                                      ("charges", "findings"))
        return report_from_tables(tables, records=records, rejected_total=rejected,
                                  period=number, from_time=from_time, until=until)

    def period_summary(self, number: int) -> bytes:
        """The signed summary of closed period `number` (TAG_PERIOD), as stored."""
        self._period_row(number)
        return bytes(self._query("SELECT summary FROM periods WHERE number = ?",
                                 (number,))[0][0])

    def statement(self, number: int, operator: str) -> bytes:
        """An operator's signed statement for closed period `number`
        (clearing.verify_statement reads it)."""
        if not isinstance(operator, str):
            raise InvalidArgument(f"operator is an operator id (str), not "
                                  f"{type(operator).__name__}")
        self._period_row(number)
        tables, _summary = archive_module.read_period(self.archive, number, ("statements",))
        found = [bytes(doc) for op, doc in zip(tables["statements"]["operator"].tolist(),
                                               tables["statements"]["document"].tolist())
                 if op == operator]
        if not found:
            raise InvalidArgument(f"no statement for operator {operator!r} in period {number}")
        return found[0]

    # -- operators and fees ----------------------------------------------------------------

    def gateways(self) -> dict[str, str | None]:
        """Every registered gateway id -> its operator (None if registered
        without one)."""
        return {str(g): None if o is None else str(o) for g, o in self._query(
            "SELECT id, operator FROM gateways")}

    def operators(self) -> dict[str, str]:
        """gateway id -> operator, for the gateways registered with one."""
        return {str(g): str(o) for g, o in self._query(
            "SELECT id, operator FROM gateways WHERE operator IS NOT NULL")}

    def set_fee_schedule(self, schedule: FeeSchedule) -> bool:
        """Store a fee schedule version: True if new, False if stored before
        with the same content; Conflict if with other content. Each version
        takes effect at its effective_from."""
        if not isinstance(schedule, FeeSchedule):
            raise InvalidArgument("a fee schedule is a qrpay.clearing.FeeSchedule")
        document = schedule.to_bytes()
        with self._write("set the same schedule again: it is stored once") as db:
            row = db.execute("SELECT document FROM fee_schedules WHERE version = ?",
                             (schedule.version,)).fetchone()
            if row is not None:
                if bytes(row[0]) != document:
                    raise Conflict(f"fee schedule version {schedule.version} is stored with "
                                   "other fees")
                return False
            db.execute("INSERT INTO fee_schedules(version, document) VALUES (?, ?)",
                       (schedule.version, document))
        return True

    def fee_schedule(self, at: int | None = None) -> FeeSchedule | None:
        """The schedule in force at `at` (the latest version already in
        effect), or the latest stored when `at` is None."""
        if at is not None:
            at = _args.integer("at", at, 0, 2**63 - 1)
        schedules = [FeeSchedule.from_bytes(bytes(d)) for (d,) in self._query(
            "SELECT document FROM fee_schedules ORDER BY version")]
        if at is not None:
            schedules = [s for s in schedules if s.effective_from <= at]
        return schedules[-1] if schedules else None

    def deny_list_version(self) -> int:
        """The latest deny list's version (0: none published): one indexed
        read, for callers that keep the parsed list while it stays latest."""
        return int(self._query("SELECT COALESCE(MAX(version), 0) FROM deny_lists")[0][0])

    def deny_list(self) -> DenyList | None:
        rows = self._query("SELECT document FROM deny_lists ORDER BY version DESC LIMIT 1")
        # Verified when it was published; still readable after the key that
        # signed it is rotated out of the trust store.
        return DenyList.reload(rows[0][0], self.trust) if rows else None

    def publish_deny_list(self, key: IssuerKey, issued_at: int,
                          revoke: Iterable[int] = ()) -> tuple[bytes, list[int]]:
        """Sign the next deny list: the previous one, every credential now
        flagged, and any serials the issuer revokes for its own reasons (a
        lost phone, a closed account). Returns the document and the serials
        it adds (the delta)."""
        if not isinstance(key, IssuerKey):
            raise InvalidKey("a deny list is signed with an IssuerKey")
        revoked = set(_serial_array(revoke).tolist())   # unsigned 64-bit, or InvalidArgument
        trusted = self.trust.get(key.kid)
        if not trusted.roles & Role.DENY_LIST:
            # Gateways would refuse the list; so would this store on its next read.
            raise IssuerKeyRole("this issuer key is not trusted to sign deny lists")
        with self._lock:
            flagged = self.report().flagged_serials() | self._flagged_before() | revoked
            # Read the previous list, sign and store in one write transaction:
            # two publishers (threads or processes) never pick one version.
            with self._write(_RETRY_DENY) as db:
                previous = self.deny_list()
                if (previous is not None and _args.is_int(issued_at)
                        and issued_at < previous.issued_at):
                    # Gateways refuse a list older than the one in force: its
                    # version would be used up for nothing.
                    raise StaleUpdate(f"issued_at {issued_at} is before the latest deny list "
                                      f"(version {previous.version}, issued at "
                                      f"{previous.issued_at}); nothing is published")
                old = {int(s) for s in previous.serials} if previous is not None else set()
                version = (previous.version if previous is not None else 0) + 1
                document = sign_deny_list(key, version, old | flagged, issued_at)
                db.execute("INSERT INTO deny_lists(version, document) VALUES (?, ?)",
                           (version, document))
                new = DenyList.reload(document, self.trust)
                earlier = db.execute("SELECT document FROM deny_lists WHERE version < ? AND "
                                     "version >= ? ORDER BY version",
                                     (version, version - DENY_DELTAS)).fetchall()
                db.executemany("INSERT INTO deny_deltas(base, version, document) VALUES (?, ?, ?)",
                               [(base.version, version, sign_deny_delta(key, base, new))
                                for base in (DenyList.reload(bytes(d), self.trust)
                                             for (d,) in earlier)])
        return document, sorted(flagged - old)

    def store_trust_bundle(self, data: bytes, root: RootPublicKey) -> bool:
        """Keep a trust bundle for gateways to fetch (GET /v1/trust), after
        verifying it against the root key: True if stored now, False if
        this very bundle is the latest already; StaleUpdate if its version
        or time is not after the latest's. Settlement's own trust store is
        not changed (trust_issuer does that)."""
        bundle = TrustBundle.load(data, root)
        with self._write("store the same bundle again: it is stored once") as db:
            row = db.execute("SELECT document FROM trust_bundles ORDER BY version DESC "
                             "LIMIT 1").fetchone()
            if row is not None:
                latest = TrustBundle.load(bytes(row[0]), root)
                if latest.raw == bundle.raw:
                    return False
                if bundle.version <= latest.version or bundle.issued_at < latest.issued_at:
                    raise StaleUpdate(f"trust bundle version {bundle.version} is not after the "
                                      f"latest stored (version {latest.version})")
            db.execute("INSERT INTO trust_bundles(version, document) VALUES (?, ?)",
                       (bundle.version, bundle.raw))
        return True

    def trust_bundle(self) -> bytes | None:
        """The latest trust bundle stored (store_trust_bundle), as signed."""
        rows = self._query("SELECT document FROM trust_bundles ORDER BY version DESC LIMIT 1")
        return bytes(rows[0][0]) if rows else None

    def deny_list_delta(self, since: int) -> bytes | None:
        """The signed delta from deny-list version `since` to the latest, if
        `since` is one of the DENY_DELTAS versions before it (else None:
        fetch the whole list)."""
        since = _args.integer("since", since, 0, 2**63 - 1)
        rows = self._query("SELECT document FROM deny_deltas WHERE base = ? AND version = "
                           "(SELECT MAX(version) FROM deny_lists)", (since,))
        return bytes(rows[0][0]) if rows else None

    def record_repayment(self, account: int, amount: int, paid_at: int, reference: str) -> bool:
        """A repayment event: part of the account history that scoring reads.
        `reference` names it once and for all (the bank's transaction
        reference): True if stored now, False if that reference was stored
        before with the same account, amount and time (a retry); Conflict if
        with others."""
        for name, value, low, top in (("account", account, 0, 2**63 - 1),
                                      ("amount", amount, 1, 2**62),
                                      ("paid_at", paid_at, 0, U32_MAX)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= top:
                raise InvalidArgument(f"{name} must be an integer from {low} to {top}, not "
                                      f"{value!r:.40}")
        return self._insert_repayments([(account, amount, paid_at, _reference(reference))]) == 1

    def record_repayments(self, accounts: npt.ArrayLike, amounts: npt.ArrayLike,
                          paid_at: npt.ArrayLike, references: Iterable[str]) -> int:
        """Many repayments (a bank's daily file) in one transaction: all or none.
        Same ranges and references as record_repayment; returns how many were
        stored now (a row whose reference is stored already, or given twice,
        with the same content counts once)."""
        try:
            columns = [np.asarray(c) for c in (accounts, amounts, paid_at)]
        except (TypeError, ValueError):     # ragged lists and the like
            raise InvalidArgument("accounts, amounts and paid_at: three 1-D integer arrays") from None
        if len({c.shape for c in columns}) != 1 or columns[0].ndim != 1:
            raise InvalidArgument("accounts, amounts and paid_at: three 1-D arrays of one length")
        for name, c, low, top in zip(("account", "amount", "paid_at"), columns, (0, 1, 0),
                                     (2**63 - 1, 2**62, U32_MAX)):
            if c.size and (c.dtype.kind not in "iu" or c.min() < low or c.max() > top):
                raise InvalidArgument(f"every {name} must be an integer from {low} to {top}")
        refs = [] if isinstance(references, str) else [
            _reference(r) for r in _args.items("references", references)]
        if len(refs) != len(columns[0]):
            raise InvalidArgument("one reference per repayment")
        return self._insert_repayments(list(zip(*(c.tolist() for c in columns), refs)))

    def _insert_repayments(self, rows: list[tuple[int, int, int, str]]) -> int:
        """Store the rows whose reference is new; returns how many."""
        new: dict[str, tuple[int, int, int, str]] = {}
        for row in rows:
            if new.setdefault(row[3], row) != row:
                raise Conflict(f"reference {row[3]!r} is given twice with other content")
        with self._write(_RETRY_REPAY) as db:
            refs = list(new)
            for at in range(0, len(refs), 500):   # within SQLite's bound on parameters
                chunk = refs[at:at + 500]
                for stored in db.execute(
                        "SELECT account, amount, paid_at, reference FROM repayments WHERE "
                        f"reference IN ({','.join('?' * len(chunk))})", chunk).fetchall():
                    _same_repayment(new.pop(stored[3]), tuple(stored))
            for stored in self._archived_repayments(db, list(new)):
                _same_repayment(new.pop(stored[3]), stored)
            # credit_history sums every repayment: refuse now what it could not add up.
            total = (db.execute("SELECT COALESCE(SUM(amount), 0) FROM repayments").fetchone()[0]
                     + db.execute("SELECT COALESCE(SUM(repaid), 0) FROM periods").fetchone()[0])
            if total + sum(amount for _, amount, _, _ in new.values()) >= credit.TOTAL_LIMIT:
                raise InvalidArgument("repayments would add up to 2**62 or more")
            db.executemany("INSERT INTO repayments(account, amount, paid_at, reference) "
                           "VALUES (?, ?, ?, ?)", list(new.values()))
        return len(new)

    def _archived_repayments(self, db: Transaction, references: list[str]
                             ) -> list[tuple[int, int, int, str]]:
        """Of `references`, those stored and moved to a period's archive since:
        (account, amount, paid_at, reference) as stored. Their hashes say
        which periods to read (a hash two references share reads one more)."""
        by_hash: dict[int, list[str]] = {}
        for reference in references:
            by_hash.setdefault(_reference_hash(reference), []).append(reference)
        periods: dict[int, set[str]] = {}
        hashes = list(by_hash)
        for at in range(0, len(hashes), 500):
            chunk = hashes[at:at + 500]
            for digest, period in db.execute(
                    "SELECT hash, period FROM repayment_refs WHERE hash IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall():
                periods.setdefault(int(period), set()).update(by_hash[int(digest)])
        found = []
        for period, wanted in sorted(periods.items()):
            table = archive_module.read_period(self.archive, period, ["repayments"])[0][
                "repayments"]
            for i in np.flatnonzero(np.isin(table["reference"], list(wanted))).tolist():
                found.append((int(table["account"][i]), int(table["amount"][i]),
                              int(table["paid_at"][i]), str(table["reference"][i])))
        return found

    def repayments(self, account: int | None = None) -> list[tuple[int, int, int]]:
        """(account, amount, paid_at) rows, oldest first: those a close
        folded into the credit state are read from their period's archive."""
        if account is not None:
            account = _args.integer("account", account, 0, 2**63 - 1)
        with self._lock:
            live = self._query("SELECT id, account, amount, paid_at FROM repayments")
            periods = [int(n) for (n,) in self._query(
                "SELECT number FROM periods WHERE repayments > 0 ORDER BY number")]
        rows = [tuple(int(x) for x in row) for row in live]
        for number in periods:
            table = archive_module.read_period(self.archive, number, ["repayments"])[0][
                "repayments"]
            rows.extend(zip(*(table[name].tolist()
                              for name in ("id", "account", "amount", "paid_at"))))
        return [(a, m, p) for _id, a, m, p in sorted(rows)
                if account is None or a == account]

    def credit_history(self, now: int, due_after: int | None = None) -> npt.NDArray[np.void]:
        """Repayment behaviour per account at `now` (one qrpay.credit.CREDIT_DTYPE
        row per account, sorted): every charged payment, due `due_after`
        seconds after its scan (the store's, by default), against every
        repayment recorded. Closed periods count through the carried credit
        state, which answers for `now` from the last close's cut on (its
        `until` less the horizon) and for the store's due_after only.
        Scoring reads it; see docs/SETTLEMENT.md (Repayments)."""
        with self._lock:   # charges and repayments as of one moment
            records, gateway, _t, _a = self._live()
            carry = self._carry()
            rows = self._query("SELECT account, amount, paid_at FROM repayments "
                               "WHERE folded = 0")
        settled = settle_period(carry, records, gateway, self._slack)
        paid = np.array(rows, dtype=np.int64).reshape(-1, 3)
        state = carry.credit
        if state is not None and len(state):
            # A repayment recorded after its time was folded counts from the cut.
            paid[:, 2] = np.maximum(paid[:, 2], int(state["cut"][0]))
        charges = np.concatenate([carry.charges, period_charges(settled)])
        return credit.history(charges["account"], charges["time"], charges["amount"],
                              paid[:, 0], paid[:, 2], paid[:, 1], now,
                              self.due_after if due_after is None else due_after, state=state)

    def _flagged_before(self) -> set[int]:
        """Serials flagged in closed periods (stored signed as int64)."""
        return {int(s) % 2**64 for (s,) in self._query("SELECT serial FROM flagged")}

    def batch_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM batches")[0][0])


def _reference_hash(reference: str) -> int:
    """A reference's 64-bit BLAKE2b, as SQLite's signed integer."""
    return int.from_bytes(hashlib.blake2b(reference.encode(), digest_size=8).digest(),
                          "little", signed=True)


def _same_repayment(given: tuple[int, int, int, str], stored: tuple[Any, ...]) -> None:
    """Conflict unless the repayment given is the one stored under its reference."""
    if given != stored:
        raise Conflict(f"reference {stored[3]!r} is stored already as account "
                       f"{stored[0]}, amount {stored[1]}, paid at {stored[2]}")


def _reference(reference: object) -> str:
    if (not isinstance(reference, str) or not 0 < len(reference) <= MAX_REFERENCE
            or not reference.isprintable()):
        raise InvalidArgument(f"a reference is 1 to {MAX_REFERENCE} printable characters")
    return str(reference)   # a plain str, also for numpy's str_


def _parse_records(items: list[Any], first: int, last: int
                   ) -> tuple[npt.NDArray[np.void], npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    if not items or last - first + 1 != len(items) or first < 1:
        raise MalformedMessage("a batch holds records first..last, one each, from 1")
    records = np.zeros(len(items), dtype=RECORD_DTYPE)
    tokens: list[bytes] = []
    for i, item in enumerate(items):
        if (not isinstance(item, list) or len(item) != 5 or not isinstance(item[1], bytes)
                or not all(isinstance(v, int) and not isinstance(v, bool)
                           for v in (item[0], item[2], item[3], item[4]))):
            raise MalformedMessage("a record is [seq, token, amount, scene, gateway_time]")
        seq, token, amount, scene, at = item
        if seq != first + i or not 0 < amount <= U32_MAX or not 0 <= at <= U32_MAX:
            raise MalformedMessage(f"record {i} has a field out of range")
        if scene not in Scene.__members__.values() or len(token) > 2 * TOKEN_LEN:
            raise MalformedMessage(f"record {i} has an unknown scene or an oversized token")
        records[i]["record"] = seq
        records[i]["amount"] = amount
        records[i]["scene"] = scene
        records[i]["gateway_time"] = at
        tokens.append(token)
    array, lengths = as_token_array(tokens)  # other lengths: rows of zeros, WRONG_LENGTH
    return records, array, lengths


def _by_account_then_time(charges: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
    """Charges (CHARGE_DTYPE) by account, then time, then as given: sorted
    and gathered a contiguous column at a time (gathering whole rows is 3
    times slower)."""
    columns = {name: np.ascontiguousarray(charges[name]) for name in CHARGE_DTYPE.names or ()}
    order = lexsorted(columns["account"], columns["time"])
    out = np.empty(len(charges), dtype=CHARGE_DTYPE)
    for name, column in columns.items():
        out[name] = column[order]
    return out


def _gateway_labels(arrivals: list[_Arrival], inside: npt.NDArray[np.bool_]
                    ) -> archive_module.Labels:
    """The gateway of each `inside` row, as codes into the gateway ids
    (_live's batches, in order): the archive writes them without a Python
    object per row."""
    names = sorted({a.gateway for a in arrivals})
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.repeat(np.array([lookup[a.gateway] for a in arrivals], dtype=np.int32),
                      [a.rows for a in arrivals])
    return archive_module.Labels(codes[inside], tuple(names))


def _records_digest(settled: Settled) -> bytes:
    """BLAKE2b-256 of the period's records as stored (RECORD_DTYPE bytes),
    read in place (the new rows are a contiguous slice)."""
    return hashlib.blake2b(settled.records[settled.new].view(np.uint8).data,
                           digest_size=32).digest()


def _joined(parts: list[npt.NDArray[np.void]], room: int = 0) -> npt.NDArray[np.void]:
    """np.concatenate(parts) of RECORD_DTYPE rows, copied as bytes: numpy
    promotes the structured dtype of each part first: 0.2 s on a day's
    4,700 batches. With `room` free rows before them (with_room)."""
    _buffer, out = with_room(sum(len(p) for p in parts), room)
    flat, at = out.view(np.uint8), 0
    for part in parts:
        size = part.nbytes
        flat[at:at + size] = part.view(np.uint8)
        at += size
    return out


def _records_table(records: npt.NDArray[np.void], gateway: archive_module.Labels
                   ) -> archive_module.Table:
    """A closed period's records as an archive table: the RECORD_DTYPE
    fields and the gateway of each, in arrival order (their tokens are in
    the tokens tables, by gateway and record number)."""
    rows: archive_module.Table = {name: records[name] for name in RECORD_DTYPE.names or ()}
    rows["gateway"] = gateway
    return rows


def _tokens_table(arrivals: list[_Arrival], records: npt.NDArray[np.void],
                  tokens: npt.NDArray[np.uint8]) -> tuple[str, archive_module.Table]:
    """The tokens the live batches that hold theirs (`tokens`, in arrival
    order) as one tokens table, and its name."""
    holds = np.repeat([a.tokens for a in arrivals], [a.rows for a in arrivals])
    first = next(a.arrival for a in arrivals if a.tokens)
    return tokenspool.part_name(first), tokenspool.tokens_table(
        _gateway_labels(arrivals, holds), records["record"][holds],
        records["gateway_time"][holds], tokens)


def _check_spooled(arrivals: list[_Arrival], parts: list[_TokenPart]) -> None:
    """Every live batch without its tokens must lie in a registered part:
    else they were lost (a damaged store), and nothing is closed."""
    bare = np.array([a.arrival for a in arrivals if not a.tokens and not a.archived],
                    dtype=np.int64)
    first = np.array([p.first_arrival for p in parts], dtype=np.int64)   # ascending
    # Covered when some part from before it reaches it (the union of the ranges).
    reach = np.maximum.accumulate(np.array([p.last_arrival for p in parts], dtype=np.int64))
    at = np.searchsorted(first, bare, side="right") - 1
    covered = (at >= 0) & (bare <= reach[np.maximum(at, 0)]) if len(parts) else at >= 0
    if not covered.all():
        raise StoreUnavailable(f"{_DAMAGED_TOKENS}: batch {int(bare[~covered][0])} holds no "
                               "tokens and no token part holds them")


def _empty_tokens(db: Transaction, arrivals: list[int], period: int | None = None) -> None:
    """Drop the tokens of these batches from their rows: archived, in a
    spooled part, or with closed `period`."""
    for at in range(0, len(arrivals), 500):   # within SQLite's bound on parameters
        chunk = arrivals[at:at + 500]
        db.execute(f"UPDATE batches SET tokens = ?, tokens_period = ? "
                   f"WHERE arrival IN ({','.join('?' * len(chunk))})", (b"", period, *chunk))


def _period_tables(settled: Settled, report: Report, clearings: list[OperatorClearing],
                   statements: list[bytes], carry_in: Carry) -> dict[str, archive_module.Table]:
    """The rest of a closed period as archive tables: the verdicts (row for
    row with the records table), the report, the clearing, the signed
    statements, and the tail and floor it was settled after."""
    new, result = settled.new, settled.result
    verdicts: archive_module.Table = {
        name: getattr(result, name)[new] for name in (
            "charged", "double_spend", "duplicate", "clone", "backwards", "invalid", "late")}
    lines = [(c.operator, line) for c in clearings for line in c.lines]
    tables: dict[str, archive_module.Table] = {
        "verdicts": verdicts,
        **report_tables(report),
        "clearing": {
            "operator": np.array([op for op, _ in lines], dtype=object),
            "scene": np.array([int(x.scene) for _, x in lines], dtype=np.uint8),
            **{name: np.array([getattr(x, name) for _, x in lines], dtype=np.int64)
               for name in ("count", "gross", "fee_bps", "fee", "net", "flagged_count",
                            "flagged_amount")},
        },
        "statements": {
            "operator": np.array([c.operator for c in clearings], dtype=object),
            "document": np.array(statements, dtype=object).reshape(-1),
        },
    }
    # The tail and floor it was settled after: with the records, enough to
    # settle it again. (The credit charges are the store's, not the period's.)
    carried = carry_in.to_tables()
    tables.update({name: carried[name] for name in ("carry_tail", "carry_floor")})
    return tables


def _near_total_limit(charged: int, state: npt.NDArray[np.void] | None) -> bool:
    """Whether the carried charges (`charged`, their exact sum) and the
    state's may add up to credit.TOTAL_LIMIT, as freeze adds them in floating
    point: then every charge is passed to freeze, for it to decide. The
    margin covers its rounding: numpy adds pairwise, off by about log2(n)
    * 2**-53 of the sum, far less than 2**-20 for any n that fits in memory."""
    frozen = float(state["charged"].astype(np.float64).sum()) if state is not None else 0.0
    return float(charged) + frozen >= credit.TOTAL_LIMIT * (1 - 2**-20)


def _kept(stored: list[_Chunk], new: _Chunk, keep: npt.NDArray[np.bool_]) -> list[_Chunk]:
    """The `stored` chunks and the `new` one with the rows `keep` keeps (of
    their charges one after the other): `new` always, a stored one where it
    lost rows (the others are not written again). A chunk that lost none
    stays archived if it was."""
    parts = np.split(keep, np.cumsum([len(chunk.charges) for chunk in stored]))
    changed = [_Chunk(chunk.name, chunk.charges[part])
               for chunk, part in zip(stored, parts) if not part.all()]
    whole = bool(parts[-1].all())
    return changed + [_Chunk(new.name, new.charges[parts[-1]], new.archived and whole)]


def _tail_row(carry: Carry) -> tuple[str, bytes]:
    """The "carry" row of `carry`: its tail and floor (its credit state is
    the credit row, its charges the chunks)."""
    tables = carry.to_tables()
    return "carry", pack_tables({name: tables[name] for name in ("carry_tail", "carry_floor")})


def _credit_row(state: npt.NDArray[np.void] | None) -> tuple[str, bytes]:
    """The credit row: the carried credit state (credit.freeze), if any."""
    columns = {} if state is None else {
        "carry_credit": {name: state[name] for name in state.dtype.names or ()}}
    return _CARRY_CREDIT, pack_tables(columns)


_ChunkRows = tuple[list[tuple[str]], list[tuple[str, bytes, int, int]]]


def _chunk_rows(chunks: list[_Chunk]) -> _ChunkRows:
    """The names of the emptied chunks (to delete) and the carry rows of the
    others: name, packed charges, earliest time and amount."""
    emptied = [(chunk.name,) for chunk in chunks if not len(chunk.charges)]
    rows = [(chunk.name, _ARCHIVED if chunk.archived else pack_tables(
                {"carry_charges": charges_table(chunk.charges)}),
             int(chunk.charges["time"].min()), int(chunk.charges["amount"].sum()))
            for chunk in chunks if len(chunk.charges)]
    return emptied, rows
