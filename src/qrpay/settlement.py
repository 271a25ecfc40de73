"""Settlement: turn gateway uploads into charges and catch what no single
offline gateway can see (docs/SETTLEMENT.md).

`ingest` applies a signed batch atomically and idempotently; every token in
it is verified again. The verdicts (charged, double spend, clone, overspend)
are derived from all stored records by the vectorised kernel in ledger.py.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args, credit, sqlitedb
from qrpay.credential import Scene
from qrpay.credit import DEFAULT_DUE_AFTER
from qrpay.denylist import DenyList, _serial_array, sign_deny_list
from qrpay.errors import (
    Conflict, InvalidArgument, InvalidKey, IssuerKeyRole, MalformedMessage, Reason,
    StaleUpdate, StoreUnavailable, UnknownGateway, UnknownKeyId,
)
from qrpay.format import (
    PUBLIC_KEY_LEN, TAG_BATCH, TOKEN_DEVICE_SIG, TOKEN_DTYPE, TOKEN_LEN, U32_MAX,
)
from qrpay.keys import GatewayPublicKey, IssuerKey, IssuerPublicKey
from qrpay.ledger import RECORD_DTYPE, LedgerResult, sequence_gaps, settle, totals_by_account
from qrpay.token import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, BatchResult, _check_window, as_token_array, verify_batch,
)
from qrpay.trust import Role, TrustedKey, TrustStore
from qrpay.wire import body_map, split_document, verify_document

STORE_FILE = "settlement.sqlite3"
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
CREATE TABLE IF NOT EXISTS repayments (
    id INTEGER PRIMARY KEY, account INTEGER NOT NULL, amount INTEGER NOT NULL,
    paid_at INTEGER NOT NULL, reference TEXT
);
CREATE TABLE IF NOT EXISTS issuer_keys (
    kid BLOB PRIMARY KEY, public BLOB NOT NULL, not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL, roles INTEGER NOT NULL
)
"""
# What the caller of each write must do when its commit failed: the outcome is
# unknown (the WAL can hold the commit, and a crash or reopen make it durable).
_RETRY_OPEN = "open the store again"
_RETRY_GATEWAY = "register the same key again: it is stored once"
_RETRY_INGEST = "ingest the same batch again: EXISTS if it was stored, APPLIED if not"
_RETRY_DENY = ("publish again and send only what that returns: a version this call may "
               "have stored was never sent, and every later one holds its serials")
_RETRY_REPAY = "record it again with the same reference: it is stored once"
_RETRY_TRUST = "trust the same key again: it is stored once"
_SETTLEMENT_ROLES = Role.CREDENTIALS | Role.DENY_LIST   # what settlement checks keys for


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
class Finding:
    """One fraud or integrity finding. `kind` is one of: double_spend, clone,
    overspend, invalid_token, duplicate_record, sequence_gap."""

    kind: str
    serial: int = 0
    account: int = 0
    counter: int = 0
    gateways: tuple[str, ...] = ()
    records: tuple[tuple[str, int], ...] = ()
    amount: int = 0          # the amount involved, or for overspend the amount over
    detail: str = ""


@dataclass(frozen=True)
class Report:
    """Charges per account (for the bank debit) and every finding."""

    accounts: npt.NDArray[np.uint64]
    amounts: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    findings: list[Finding] = field(default_factory=list)
    records: int = 0
    charged_total: int = 0
    rejected_total: int = 0

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def flagged_serials(self) -> set[int]:
        """Credentials to deny: caught in a double spend, a clone or an overspend."""
        return {f.serial for f in self.findings
                if f.kind in ("double_spend", "clone", "overspend")}

    def charge_of(self, account: int) -> int:
        at = np.searchsorted(self.accounts, np.uint64(account))
        hit = at < len(self.accounts) and self.accounts[at] == account
        return int(self.amounts[at]) if hit else 0


class Settlement:
    """The settlement store (an SQLite file in `directory`) with the registry
    of gateway keys and of the issuer keys it trusts to re-verify tokens.

    `self.trust` is the issuer keys stored in the store (`trust_issuer`)
    together with those of `trust`, which are used by this object only and
    never stored; a key in both is used as stored."""

    def __init__(self, directory: str | Path, trust: TrustStore | None = None,
                 gateways: Iterable[GatewayPublicKey] = (), *,
                 max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW,
                 threads: int = 1) -> None:
        threads = _args.threads(threads)   # as verify_batch would at the first ingest
        if trust is not None and not isinstance(trust, TrustStore):
            raise InvalidArgument(f"trust must be a TrustStore or None, not "
                                  f"{type(trust).__name__}")
        max_age, skew = _check_window(max_age, skew)
        if not isinstance(directory, (str, os.PathLike)):
            raise InvalidArgument(f"directory is a path, not {type(directory).__name__}")
        gateways = _args.items("gateways", gateways)
        self.directory = Path(directory)
        # Settlement's own store: the caller's keys are copied in (and the
        # stored ones added after the schema is there), so it never changes
        # a store the caller shares with gateways.
        self.trust = TrustStore(**({} if trust is None else {"cache_size": trust._cache_size}))
        for entry in trust or ():
            self.trust.add(entry.key, entry.not_before, entry.not_after, entry.roles)
        self.max_age = max_age
        self.skew = skew
        self.threads = threads
        self._lock = threading.RLock()  # one connection: calls take turns
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"settlement store {self.directory}: {exc}") from exc
        self._db = sqlitedb.connect(self.directory / STORE_FILE, StoreUnavailable)
        try:
            with self._write(_RETRY_OPEN) as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                columns = {row[1] for row in db.execute("PRAGMA table_info(repayments)")}
                if "reference" not in columns:   # a store made before references
                    db.execute("ALTER TABLE repayments ADD COLUMN reference TEXT")
                # Older rows keep a NULL reference, which UNIQUE lets repeat.
                db.execute("CREATE UNIQUE INDEX IF NOT EXISTS repayments_reference "
                           "ON repayments(reference)")
            self._load_trust()
        except BaseException:
            self._db.close()
            raise
        for key in gateways:
            self.register_gateway(key)

    @contextmanager
    def _write(self, retry: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the lock. A failure after the body ran
        is a failed COMMIT (say fdatasync returned EIO): rolled back here, yet
        its frames may be in the WAL, and a crash or a reopen can still make it
        durable. Its outcome is unknown, and the error says so and what to
        retry (`retry`)."""
        with self._lock:
            ran = False
            try:
                with sqlitedb.transaction(self._db, StoreUnavailable) as db:
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
            return sqlitedb.query(self._db, StoreUnavailable, "settlement store", sql, args)

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
            db.execute("INSERT OR REPLACE INTO issuer_keys(kid, public, not_before, not_after, "
                       "roles) VALUES (?, ?, ?, ?, ?)",
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

    def register_gateway(self, key: GatewayPublicKey) -> str:
        if not isinstance(key, GatewayPublicKey):
            raise InvalidArgument("gateways are registered by their GatewayPublicKey")
        gateway_id = key.gateway_id
        with self._write(_RETRY_GATEWAY) as db:
            row = db.execute("SELECT public FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is not None and row[0] != key.to_bytes():
                raise InvalidArgument(f"gateway id {gateway_id} already names another key")
            if row is None:
                db.execute("INSERT INTO gateways(id, public) VALUES (?, ?)",
                           (gateway_id, key.to_bytes()))
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
        return IngestResult(IngestStatus.APPLIED, gateway_id, seq, len(records),
                            int(np.count_nonzero(reasons != Reason.OK)))

    def _verify(self, tokens: npt.NDArray[np.uint8], records: npt.NDArray[np.void],
                lengths: npt.NDArray[np.int64]) -> BatchResult:
        return verify_batch(tokens, self.trust, records["gateway_time"].astype(np.int64),
                            max_age=self.max_age, skew=self.skew, threads=self.threads,
                            lengths=lengths)

    def _status(self, gateway_id: str, seq: int, first: int, last: int,
                digest: bytes) -> IngestStatus | None:
        """EXISTS or CONFLICT if (gateway, seq) or its record range is taken."""
        with self._lock:
            existing = self._query("SELECT digest FROM batches WHERE gateway = ? AND seq = ?",
                                   (gateway_id, seq))
            if existing:
                return IngestStatus.EXISTS if existing[0][0] == digest else IngestStatus.CONFLICT
            overlap = self._query("SELECT 1 FROM batches WHERE gateway = ? AND first <= ? "
                                  "AND last >= ?", (gateway_id, last, first))
        # The same record numbers under another batch number.
        return IngestStatus.CONFLICT if overlap else None

    # -- outputs -----------------------------------------------------------------------

    def _load(self) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64], list[str],
                             list[tuple[str, int, int, int]]]:
        rows = self._query("SELECT gateway, seq, first, last, records FROM batches "
                           "ORDER BY arrival")
        names = sorted({r[0] for r in rows})
        index = {name: i for i, name in enumerate(names)}
        parts = [np.frombuffer(r[4], dtype=RECORD_DTYPE) for r in rows]
        records = np.concatenate(parts) if parts else np.zeros(0, dtype=RECORD_DTYPE)
        gateway = np.repeat(np.array([index[r[0]] for r in rows], dtype=np.int64),
                            [len(p) for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        return records, gateway, names, [(r[0], r[1], r[2], r[3]) for r in rows]

    def _settled(self) -> tuple[npt.NDArray[np.void], npt.NDArray[np.int64], list[str],
                                list[tuple[str, int, int, int]], LedgerResult]:
        """Everything ingested, and the ledger's verdict on each record."""
        records, gateway, names, batches = self._load()
        return records, gateway, names, batches, settle(records, gateway,
                                                         slack=self.max_age + 2 * self.skew)

    def report(self) -> Report:
        """Charges and findings over everything ingested so far."""
        records, gateway, names, batches, result = self._settled()
        accounts, amounts, counts = totals_by_account(records, result.charged)
        findings = _findings(records, gateway, names, result)
        findings += _gaps(records, gateway, names, batches)
        return Report(accounts, amounts, counts, findings, len(records),
                      int(amounts.sum()), int(records["amount"][~result.charged].astype(
                          np.int64).sum()))

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
            flagged = self.report().flagged_serials() | revoked
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
        return document, sorted(flagged - old)

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
                    if new.pop(stored[3]) != stored:
                        raise Conflict(f"reference {stored[3]!r} is stored already as account "
                                       f"{stored[0]}, amount {stored[1]}, paid at {stored[2]}")
            # credit_history sums every repayment: refuse now what it could not add up.
            total = db.execute("SELECT COALESCE(SUM(amount), 0) FROM repayments").fetchone()[0]
            if total + sum(amount for _, amount, _, _ in new.values()) >= credit.TOTAL_LIMIT:
                raise InvalidArgument("repayments would add up to 2**62 or more")
            db.executemany("INSERT INTO repayments(account, amount, paid_at, reference) "
                           "VALUES (?, ?, ?, ?)", list(new.values()))
        return len(new)

    def repayments(self, account: int | None = None) -> list[tuple[int, int, int]]:
        """(account, amount, paid_at) rows, oldest first."""
        if account is not None:
            account = _args.integer("account", account, 0, 2**63 - 1)
        if account is None:
            rows = self._query("SELECT account, amount, paid_at FROM repayments ORDER BY id")
        else:
            rows = self._query("SELECT account, amount, paid_at FROM repayments "
                               "WHERE account = ? ORDER BY id", (account,))
        return [(int(a), int(m), int(p)) for a, m, p in rows]

    def credit_history(self, now: int, due_after: int = DEFAULT_DUE_AFTER
                       ) -> npt.NDArray[np.void]:
        """Repayment behaviour per account at `now` (one qrpay.credit.CREDIT_DTYPE
        row per account, sorted): every charged payment ingested so far, due
        `due_after` seconds after its scan, against every repayment recorded.
        Scoring reads it; see docs/SETTLEMENT.md (Repayments)."""
        with self._lock:   # charges and repayments as of one moment
            records, _gateway, _names, _batches, result = self._settled()
            rows = self._query("SELECT account, amount, paid_at FROM repayments")
        charged = records[result.charged]
        paid = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return credit.history(charged["account"], charged["gateway_time"], charged["amount"],
                              paid[:, 0], paid[:, 2], paid[:, 1], now, due_after)

    def batch_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM batches")[0][0])


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


def _findings(records: npt.NDArray[np.void], gateway: npt.NDArray[np.int64], names: list[str],
              result: LedgerResult) -> list[Finding]:
    """Turn the kernel's masks into findings: a loop over flagged rows only."""
    found: list[Finding] = []

    def where(i: int) -> tuple[str, int]:
        return names[gateway[i]], int(records["record"][i])

    for kind, mask in (("double_spend", result.double_spend), ("clone", result.clone),
                       ("duplicate_record", result.duplicate)):
        for i in np.flatnonzero(mask).tolist():
            r, first = records[i], int(result.first_row[i])
            found.append(Finding(kind, int(r["serial"]), int(r["account"]), int(r["counter"]),
                                 (names[gateway[first]], names[gateway[i]]),
                                 (where(first), where(i)), int(r["amount"])))
    for mask, detail in ((result.backwards, "counter went backwards"),
                         (result.found_behind, "counter went backwards (charged: it arrived first)")):
        for i in np.flatnonzero(mask).tolist():
            r = records[i]
            found.append(Finding("clone", int(r["serial"]), int(r["account"]),
                                 int(r["counter"]), (names[gateway[i]],), (where(i),),
                                 int(r["amount"]), detail))
    for i in np.flatnonzero(result.invalid).tolist():
        r = records[i]
        found.append(Finding("invalid_token", int(r["serial"]), int(r["account"]),
                             int(r["counter"]), (names[gateway[i]],), (where(i),),
                             int(r["amount"]), Reason(int(r["reason"])).name))
    for account, serial, at, spent, limit in zip(
            result.over_account.tolist(), result.over_serial.tolist(),
            result.over_at.tolist(), result.over_spent.tolist(), result.over_limit.tolist()):
        found.append(Finding("overspend", serial, account, 0, (), (), spent - limit,
                             f"{spent} outstanding offline against a limit of {limit} at {at}"))
    return found


def _gaps(records: npt.NDArray[np.void], gateway: npt.NDArray[np.int64], names: list[str],
          batches: list[tuple[str, int, int, int]]) -> list[Finding]:
    found = []
    for g, name in enumerate(names):
        for start, end in sequence_gaps(records["record"][gateway == g]):
            found.append(Finding("sequence_gap", gateways=(name,),
                                 detail=f"records {start}..{end} missing"))
        seqs = sorted(seq for gw, seq, _f, _l in batches if gw == name)
        for start, end in sequence_gaps(np.array(seqs, dtype=np.uint64)):
            found.append(Finding("sequence_gap", gateways=(name,),
                                 detail=f"batches {start}..{end} missing"))
    return found
