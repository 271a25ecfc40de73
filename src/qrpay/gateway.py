"""The offline gateway (the scanner on a bus, the clinic desk).

It verifies tokens through the core's batch path, applies the deny list,
scene, replay and offline-credit checks in the order of docs/GATEWAY.md,
journals every accepted payment durably (one commit per batch), and exports
signed upload batches for settlement. All its state is rebuilt from the
journal when it opens.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, NamedTuple, Protocol, TypeVar, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay.anchor import Anchor, AnchorFile
from qrpay.credential import Scene, as_scene
from qrpay.denylist import DenyDelta, DenyList, serials_digest
from qrpay.errors import (
    BadSignature, ClockUntrusted, InvalidArgument, JournalUnavailable, MalformedMessage,
    MalformedText, QrPayError, Reason, StaleUpdate, raise_for,
)
from qrpay.format import MAX_TIME, MAX_WINDOW, TAG_BATCH, U32_MAX
from qrpay.journal import Batch, Journal, Record
from qrpay.keys import GatewayKey, RootPublicKey
from qrpay.qr import decode_text
from qrpay.token import DEFAULT_MAX_AGE, DEFAULT_SKEW, BatchResult, verify_batch
from qrpay.trust import TrustStore
from qrpay.trustbundle import TrustBundle
from qrpay.wire import sign_document

if TYPE_CHECKING:   # httpx is an extra: imported when a sync runs
    from qrpay.sync import SettlementClient, SyncReport

BATCH_FORMAT = 1
JOURNAL_FILE = "journal.sqlite3"
LOCK_FILE = "gateway.lock"
LAST_SYNC_KEY = "last_sync"   # journal meta: Unix time of the last sync without a problem

ScanInput = Union[bytes, bytearray, memoryview, str]
_T = TypeVar("_T")

DEFAULT_TRANSACTION_CAPS: Mapping[Scene, int] = {
    Scene.BUS: 1_000, Scene.FERRY: 3_000, Scene.METRO: 1_500, Scene.CLINIC: 50_000,
    Scene.CANTEEN: 5_000, Scene.LIBRARY: 2_000, Scene.RETAIL: 20_000,
}


@dataclass(frozen=True)
class GatewayPolicy:
    """What a gateway accepts offline. Amounts are minor units (fen, cents),
    times seconds. docs/GATEWAY.md explains each knob."""

    max_age: int = DEFAULT_MAX_AGE
    skew: int = DEFAULT_SKEW
    transaction_caps: Mapping[Scene, int] = field(
        default_factory=lambda: dict(DEFAULT_TRANSACTION_CAPS))
    max_offline_uses: int = 30
    clock_tolerance: int = 5
    deny_list_max_age: int | None = 2 * 86_400
    stale_transaction_cap: int = 300
    retention: int = 7 * 86_400

    def __post_init__(self) -> None:
        # Whole seconds and minor units: ints in range (a NaN, a bool or a
        # string is InvalidArgument here, not a TypeError at the first scan).
        for name, low, top in (("max_age", 0, MAX_WINDOW), ("skew", 0, MAX_WINDOW),
                               ("clock_tolerance", 0, MAX_WINDOW), ("retention", 0, MAX_TIME),
                               ("stale_transaction_cap", 0, 2**62),
                               ("max_offline_uses", 1, 2**62)):
            _args.integer(name, getattr(self, name), low, top)
        if self.deny_list_max_age is not None:
            _args.integer("deny_list_max_age", self.deny_list_max_age, 0, MAX_TIME)
        caps = self.transaction_caps
        if not isinstance(caps, Mapping) or set(caps) != set(Scene):
            raise InvalidArgument("transaction_caps needs a cap for every scene")
        for cap in caps.values():
            _args.integer("a transaction cap", cap, 0, 2**62)

    @property
    def replay_window(self) -> int:
        # A token stays fresh for at most max_age + 2 * skew after it is scanned,
        # so a replay can only get past freshness within this window.
        return self.max_age + 2 * self.skew + self.clock_tolerance

    @property
    def prune_after(self) -> int:
        # Never forget a payment whose token could still pass freshness.
        return max(self.retention, self.replay_window)


class Receipt(NamedTuple):
    """An acknowledged payment: it is in the journal (committed) when you hold
    this. Immutable; a NamedTuple because a gateway makes one per scan."""

    gateway: str
    record: int
    account: int
    serial: int
    counter: int
    amount: int
    scene: Scene
    gateway_time: int
    duplicate: bool = False


@dataclass(frozen=True)
class ScanResult:
    """Per-token outcome of scan_batch: reason codes (0 = accepted) and the
    receipt of every accepted token (None where rejected)."""

    reasons: npt.NDArray[np.uint8]
    receipts: list[Receipt | None]

    @property
    def ok(self) -> npt.NDArray[np.bool_]:
        return np.equal(self.reasons, Reason.OK)

    def __len__(self) -> int:
        return len(self.reasons)


@dataclass
class _Spend:
    amount: int = 0
    uses: int = 0


class GatewayObserver(Protocol):
    """Told what a gateway did, for monitoring (qrpay.metrics.GatewayMetrics
    is one): once per scan or scan_batch call and once per journal commit,
    never per token. Called inside the gateway's calls, so it must be
    quick; whatever it raises is ignored."""

    def scanned(self, reasons: npt.NDArray[np.uint8], seconds: float) -> None:
        """A scan_batch call's reason codes (0 = accepted) and its duration."""

    def scan_failed(self, reason: Reason) -> None:
        """A scan_batch call raised for the whole batch (ClockUntrusted, ...)."""

    def committed(self, seconds: float) -> None:
        """A journal transaction committed, in `seconds`."""


class _Doubt(NamedTuple):
    """A journal write whose commit failed: its outcome is unknown until the
    rows it may have written (records from `record` on, batches from `batch`
    on; 0 for none) are durably voided."""

    id: int
    record: int
    batch: int


class Gateway:
    """A scanner's verifier and journal. Open one per directory; one process
    owns a directory at a time, and its threads may share one Gateway (calls
    take turns on the journal; token verification runs outside the turn)."""

    def __init__(self, directory: str | Path, key: GatewayKey, trust: TrustStore,
                 policy: GatewayPolicy | None = None,
                 clock: Callable[[], float] = time.time, *,
                 root: RootPublicKey | None = None) -> None:
        if not isinstance(key, GatewayKey):
            raise InvalidArgument("a gateway signs with a GatewayKey")
        if not isinstance(trust, TrustStore):
            raise InvalidArgument("a gateway verifies against a TrustStore")
        if policy is not None and not isinstance(policy, GatewayPolicy):
            raise InvalidArgument("policy is a GatewayPolicy")
        if not callable(clock):
            raise InvalidArgument("clock is a function returning Unix seconds")
        if root is not None and not isinstance(root, RootPublicKey):
            raise InvalidArgument("root is the RootPublicKey trust bundles are signed with")
        if not isinstance(directory, (str, os.PathLike)):
            raise InvalidArgument("directory is a path")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalUnavailable(f"cannot create {self.directory}: {exc}") from exc
        self.key = key
        self.trust = trust
        self.root = root
        self.trust_bundle: TrustBundle | None = None
        self.policy = policy or GatewayPolicy()
        self._clock = clock
        self.observer: GatewayObserver | None = None   # qrpay.metrics sets one
        self.id = key.public.gateway_id
        self._key_bytes = key.public.to_bytes()
        self._mutex = threading.RLock()   # one turn at a time on the journal and the state
        self._doubt: _Doubt | None = None
        self._journal: Journal | None = None
        self._anchor: AnchorFile | None = None
        self._opened = False          # True once the state is rebuilt and checked
        self._lock = _lock_directory(self.directory)
        try:
            self._open()
        except BaseException:   # a failed open leaves neither the files nor the lock held
            self.close()
            raise

    def _open(self) -> None:
        """Open the anchor, then the journal; refuse a journal that is missing,
        empty or behind its anchor (docs/GATEWAY.md, Failure modes)."""
        self._anchor, anchored = AnchorFile.open(self.directory)
        anchor = self._anchor.current
        mine = self.key.public.to_bytes()
        path = self.directory / JOURNAL_FILE
        if anchored and anchor.gateway_key != mine:
            raise InvalidArgument("this gateway directory belongs to another gateway key")
        if anchored and not _has_content(path):
            raise JournalUnavailable(_behind(path, anchor, "is missing or empty"))
        try:
            self._journal = journal = Journal(path, create=not anchored)
        except JournalUnavailable as exc:
            raise (JournalUnavailable(_behind(path, anchor, f"cannot be opened ({exc})"))
                   if anchored else exc) from exc
        owner = journal.get("gateway_key")
        if owner is None:
            journal.set("gateway_key", mine)
        elif owner != mine:
            raise InvalidArgument("this journal belongs to another gateway key")
        resolved = journal.get_int("resolved_doubt")
        self._doubts = max(anchor.doubt, resolved)   # doubt ids are never reused
        if anchored and anchor.doubt > resolved:
            # A commit failed and the process stopped before it was voided.
            journal.void(anchor.doubt, anchor.doubt_record, anchor.doubt_batch)
        self._rebuild()
        if anchored:
            lag = self._lag(anchor)
            if lag:
                raise JournalUnavailable(_behind(path, anchor, lag))
            self._save_anchor(sync=True)
        else:
            try:
                self._anchor.create(self._anchor_state())
            except OSError as exc:
                raise JournalUnavailable(f"cannot write {self._anchor.path}: {exc}") from exc
        self._opened = True

    def _lag(self, anchor: Anchor) -> str | None:
        """How the journal falls short of its anchor, or None."""
        for what, has, needs in (
                ("last record", self._next_record - 1, anchor.last_record),
                ("time floor", self._floor, anchor.time_floor),
                ("last batch", self._next_batch - 1, anchor.last_batch),
                ("deny-list version", self.deny_list.version, anchor.deny_version)):
            if has < needs:
                return f"is behind its anchor (its {what} is {has}, the anchor's {needs})"
        return None

    def _anchor_state(self) -> Anchor:
        assert self._anchor is not None
        return self._anchor.current._replace(
            gateway_key=self._key_bytes, last_record=self._next_record - 1,
            time_floor=self._floor, last_batch=self._next_batch - 1,
            deny_version=self.deny_list.version)

    def _save_anchor(self, sync: bool) -> None:
        """Bring the anchor up to the journal. Best effort: a lagging anchor
        only weakens the next open's check (it never leads the journal), so a
        failure here does not undo a payment that is already durable."""
        assert self._anchor is not None
        try:
            self._anchor.write(self._anchor_state(), sync)
        except OSError:
            pass

    # -- state -------------------------------------------------------------------------

    def _rebuild(self) -> None:
        """Replay and spend state from the journal (the single source of truth)."""
        j = self._journal
        assert j is not None
        self._floor = j.time_floor()
        last_batch, self._exported_through, self._acked_through = j.batch_summary()
        self._next_batch = last_batch + 1
        self._next_record = j.next_record_seq()
        # Tokens issued at or before this were in pruned records: refused as stale.
        self._forgotten = j.get_int("forgotten_issued_at", -1)
        # Replay state. Every journaled (serial, counter) stays in `_seen` (an int
        # each); full records, for double taps and receipts, only while a copy
        # of their token could still be fresh.
        self._seen: set[int] = j.keys()
        self._accepted: dict[tuple[int, int], Record] = {}
        self._spend: dict[int, _Spend] = {}
        since = self._floor - self.policy.replay_window
        for r in j.records(after_seq=self._acked_through, since_time=since):
            self._accepted[(r.serial, r.counter)] = r
            if r.seq > self._acked_through:
                s = self._spend.setdefault(r.account, _Spend())
                s.amount += r.amount
                s.uses += 1
        bundle = j.get("trust_bundle")
        if isinstance(bundle, bytes):
            # Applied before the deny list is read back: it may be signed
            # by a key only the bundle trusts.
            if self.root is None:
                raise InvalidArgument("this gateway holds a trust bundle: open it with root=")
            try:
                self.trust_bundle = TrustBundle.load(bundle, self.root)
            except (BadSignature, MalformedMessage) as exc:
                raise JournalUnavailable(f"the stored trust bundle does not verify: {exc}"
                                         ) from exc
            self.trust_bundle.apply_to(self.trust)
        raw = j.get("deny_list")
        self.deny_list = DenyList.empty()
        if isinstance(raw, bytes):
            self.deny_list = DenyList.reload(raw, self.trust)

    @property
    def time_floor(self) -> int:
        """The trusted time floor: the latest scan journaled, or the time the
        deny list in force says it was signed (less the skew), if later."""
        if not self.deny_list.version:
            return self._floor
        return max(self._floor, self.deny_list.issued_at - self.policy.skew)

    def offline_spend(self, account: int) -> tuple[int, int]:
        """(amount, uses) of `account` on this gateway since the last ack."""
        if not _args.is_int(account):
            raise InvalidArgument(f"an account is an integer, not {account!r:.80}")
        with self._mutex:
            s = self._spend.get(account, _Spend())
            return s.amount, s.uses

    def _trusted_now(self, now: float | None) -> int:
        t = self._read_clock(now)
        self._check_time(t)
        return t

    def _read_clock(self, now: float | None) -> int:
        """`now`, or the clock's reading, as whole Unix seconds."""
        if now is None:
            try:
                reading = self._clock()
            except Exception as exc:   # a clock that fails is not one to trust
                raise ClockUntrusted(f"the clock failed: {exc!r:.200}") from exc
            if not _is_time(reading):
                raise ClockUntrusted(f"the clock reads {reading!r}, not a time")
            t = int(reading)
        elif _is_time(now):
            t = int(now)
        else:
            raise InvalidArgument(f"now must be Unix seconds from 0 to 2**40, not {now!r}")
        return t

    def _check_time(self, t: int) -> None:
        floor = self.time_floor
        if t < floor - self.policy.clock_tolerance:
            raise ClockUntrusted(f"clock reads {t}, below the trusted floor {floor}")

    # -- durable writes ----------------------------------------------------------------

    def _write(self, action: Callable[[], _T], record: int = 0, batch: int = 0) -> _T:
        """Run one journal write (`action`, one transaction). If it fails, its
        outcome is unknown: the commit may be in the WAL and come back after a
        crash. So before raising, void what it may have written (records from
        number `record` on, batches from `batch` on) in a durable transaction;
        if that fails too, the gateway stays in doubt and refuses every call
        until a retry of the void succeeds (or, after a restart, the open
        does it from the doubt noted in the anchor). A KeyboardInterrupt (or
        any other exception) during the write is a doubt too: the commit may
        have returned just before it; it is voided, then re-raised."""
        assert self._doubt is None and self._journal is not None and self._anchor is not None
        started = time.perf_counter()
        try:
            result = action()
        except BaseException as exc:
            failure = exc
        else:
            observer = self.observer
            if observer is not None:
                try:
                    observer.committed(time.perf_counter() - started)
                except Exception:   # monitoring never undoes a commit
                    pass
            return result
        self._doubts += 1
        self._doubt = doubt = _Doubt(self._doubts, record, batch)
        try:   # noted first, so an open after a crash voids it even if the next step fails
            self._anchor.write(self._anchor.current._replace(
                doubt=doubt.id, doubt_record=record, doubt_batch=batch), sync=True)
        except OSError:
            pass
        try:
            self._journal.void(*doubt)
            # Memory follows the journal, whatever part of the failed write it kept.
            self._rebuild()
        except JournalUnavailable:
            raise JournalUnavailable(
                f"journal write failed ({failure}) and could not be undone yet: nothing from "
                "this call is charged or acknowledged; the gateway refuses every call until "
                "the journal is writable again") from failure
        self._doubt = None
        if not isinstance(failure, JournalUnavailable):
            raise failure
        raise JournalUnavailable(f"journal write failed ({failure}): nothing from this call was "
                                 "journaled or charged; it can be tried again") from failure

    def _ready(self) -> Journal:
        """Every call starts here, in its turn: the journal, once no earlier
        write is in doubt. If one is, reopen the journal as a restart would
        (WAL recovery), void the doubtful rows and rebuild the state from what
        is there; or raise."""
        if self._journal is None:
            raise JournalUnavailable("the gateway is closed")
        doubt = self._doubt
        if doubt is None:
            return self._journal
        self._journal.close()
        try:
            self._journal = Journal(self.directory / JOURNAL_FILE, create=False)
            self._journal.void(*doubt)
            self._rebuild()
        except JournalUnavailable as exc:
            raise JournalUnavailable(f"an earlier journal write is still in doubt and cannot "
                                     f"be undone yet ({exc}); nothing is accepted") from exc
        self._doubt = None
        self._save_anchor(sync=True)
        return self._journal

    # -- deny list ---------------------------------------------------------------------

    def update_deny_list(self, data: bytes, now: float | None = None) -> DenyList:
        """Apply a signed deny list if it verifies and is newer than the one in
        force; otherwise raise (BadSignature, StaleUpdate, ...) and keep the old.
        Applying the list in force again changes nothing (a retry is safe)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"a deny list is bytes, not {type(data).__name__}")
        with self._mutex:
            journal = self._ready()
            t = self._trusted_now(now)
            if self.deny_list.version and data == self.deny_list.raw:
                return self.deny_list
            new = DenyList.load(data, self.trust, t)
            if new.issued_at > t + self.policy.skew:
                # A list from the future would look fresh for too long.
                raise StaleUpdate(f"deny list issued at {new.issued_at}, after now ({t})")
            if new.version <= self.deny_list.version:
                raise StaleUpdate(f"deny list version {new.version} is not newer than "
                                  f"{self.deny_list.version}")
            if new.issued_at < self.deny_list.issued_at:
                # Newer by number, older by date: it would move trusted time
                # back and make the list look fresher than the one it replaces.
                raise StaleUpdate(f"deny list version {new.version} was issued at "
                                  f"{new.issued_at}, before the list in force (version "
                                  f"{self.deny_list.version}, issued at "
                                  f"{self.deny_list.issued_at})")
            self._write(lambda: journal.set("deny_list", new.raw))
            self.deny_list = new
            self._save_anchor(sync=True)
            return new

    def apply_deny_delta(self, data: bytes, now: float | None = None) -> DenyList:
        """Apply a signed deny-list delta (from the settlement service) on
        top of the list in force: it must start from that list's version,
        verify, and make exactly the list its signed digest names; otherwise
        raise (StaleUpdate when it starts elsewhere: fetch the whole list)
        and keep the old one."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessage(f"a deny-list delta is bytes, not {type(data).__name__}")
        with self._mutex:
            journal = self._ready()
            t = self._trusted_now(now)
            delta = DenyDelta.load(bytes(data), self.trust)
            if (self.deny_list.version == delta.version
                    and serials_digest(self.deny_list.serials) == delta.digest):
                return self.deny_list    # the list it makes is in force: a retry
            if delta.issued_at > t + self.policy.skew:
                raise StaleUpdate(f"deny-list delta issued at {delta.issued_at}, after now ({t})")
            new = delta.apply(self.deny_list)
            self._write(lambda: journal.set("deny_list", new.raw))
            self.deny_list = new
            self._save_anchor(sync=True)
            return new

    def update_trust(self, data: bytes, now: float | None = None) -> TrustBundle:
        """Apply a trust bundle signed by this gateway's root key: its issuer
        keys are added to (or replace theirs in) the trust store, from now
        on and after every reopen. Only a newer version, issued no later
        than now (plus the skew); the bundle held again changes nothing."""
        if self.root is None:
            raise InvalidArgument("this gateway has no root key: open it with root=")
        with self._mutex:
            journal = self._ready()
            t = self._trusted_now(now)
            held = self.trust_bundle
            if held is not None and data == held.raw:
                return held
            bundle = TrustBundle.load(data, self.root)
            if bundle.issued_at > t + self.policy.skew:
                raise StaleUpdate(f"trust bundle issued at {bundle.issued_at}, after now ({t})")
            if held is not None and (bundle.version <= held.version
                                     or bundle.issued_at < held.issued_at):
                raise StaleUpdate(f"trust bundle version {bundle.version} is not newer than "
                                  f"version {held.version}")
            self._write(lambda: journal.set("trust_bundle", bundle.raw))
            bundle.apply_to(self.trust)
            self.trust_bundle = bundle
            return bundle

    def deny_list_stale(self, now: int) -> bool:
        if not _is_time(now):
            raise InvalidArgument(f"now must be Unix seconds from 0 to 2**40, not {now!r:.80}")
        limit = self.policy.deny_list_max_age
        return limit is not None and now - self.deny_list.issued_at > limit

    # -- scanning ----------------------------------------------------------------------

    def scan(self, token: ScanInput, amount: int, scene: Scene,
             now: float | None = None) -> Receipt:
        """Scan one token for `amount`; return its receipt once journaled, or
        raise the typed error of the first check that failed."""
        result = self.scan_batch([token], [amount], scene, now)
        receipt = result.receipts[0]
        if receipt is None:
            raise_for(int(result.reasons[0]))
        return receipt

    def scan_batch(self, tokens: Sequence[ScanInput], amounts: Sequence[int] | npt.ArrayLike,
                   scene: Scene, now: float | None = None) -> ScanResult:
        """Scan many tokens with one journal commit. Never raises per token;
        raises ClockUntrusted or JournalUnavailable for the whole batch (then
        nothing in it was accepted, and nothing in it is charged)."""
        observer = self.observer
        if observer is None:
            return self._scan_batch(tokens, amounts, scene, now)
        started = time.perf_counter()
        try:
            result = self._scan_batch(tokens, amounts, scene, now)
        except QrPayError as exc:
            try:
                observer.scan_failed(exc.reason)
            except Exception:
                pass
            raise
        try:
            observer.scanned(result.reasons, time.perf_counter() - started)
        except Exception:   # the receipts are journaled: monitoring never loses them
            pass
        return result

    def _scan_batch(self, tokens: Sequence[ScanInput],
                    amounts: Sequence[int] | npt.ArrayLike, scene: Scene,
                    now: float | None) -> ScanResult:
        t = self._trusted_now(now)
        scene = as_scene(scene)
        if isinstance(tokens, (str, bytes, bytearray, memoryview)) or not isinstance(
                tokens, Sequence):
            raise InvalidArgument("tokens is a sequence of tokens, not one token")
        n = len(tokens)
        try:
            amount_arr = np.asarray(amounts)
        except (TypeError, ValueError):    # ragged lists and the like
            amount_arr = np.asarray(None)
        if amount_arr.shape != (n,) or (n and amount_arr.dtype.kind not in "iu"):
            raise InvalidArgument("one integer amount per token")
        if n and (amount_arr.min() <= 0 or amount_arr.max() > U32_MAX):
            raise InvalidArgument("amounts are positive minor units below 2**32")
        raw, text_bad = _as_bytes(tokens)
        # Verification needs no gateway state: it runs outside the turn, so
        # threads sharing a gateway verify in parallel.
        checked = verify_batch(raw, self.trust, t, max_age=self.policy.max_age,
                               skew=self.policy.skew)
        with self._mutex:
            journal = self._ready()
            self._check_time(t)   # another thread's commit may have raised the floor
            return self._admit(journal, checked, raw, text_bad, amount_arr, scene, t)

    def _admit(self, journal: Journal, checked: BatchResult, raw: list[bytes],
               text_bad: npt.NDArray[np.bool_], amount_arr: npt.NDArray[np.integer],
               scene: Scene, t: int) -> ScanResult:
        """The gateway checks after verification, and the journal commit."""
        n = len(raw)
        reasons = checked.reasons.copy()
        reasons[text_bad] = Reason.MALFORMED_TEXT
        ok = reasons == Reason.OK
        if self._forgotten >= 0:
            # Older than a payment the journal pruned: replay state is gone for it.
            forgotten = ok & (checked.issued_at <= self._forgotten)
            reasons[forgotten] = Reason.TOKEN_STALE
            ok &= ~forgotten
        reasons[ok & self.deny_list.contains(checked.serial)] = Reason.REVOKED
        reasons[(reasons == Reason.OK) & (checked.scene != scene)] = Reason.SCENE_MISMATCH

        receipts: list[Receipt | None] = [None] * n
        new: list[Record] = []
        fresh: dict[tuple[int, int], Record] = {}
        packed: list[int] = []                    # fresh keys as serial << 32 | counter
        pending: dict[int, _Spend] = {}
        cap = self.policy.transaction_caps[scene]
        scene_value = int(scene)
        stale_cap = self.policy.stale_transaction_cap if self.deny_list_stale(t) else None
        max_uses = self.policy.max_offline_uses
        seq = self._next_record
        # Plain Python ints, converted once per column rather than per token.
        serials, counters = checked.serial.tolist(), checked.counter.tolist()
        accounts, limits, amount_list = (checked.account.tolist(), checked.limit.tolist(),
                                         amount_arr.tolist())
        no_spend = _Spend()
        for i in np.flatnonzero(reasons == Reason.OK).tolist():
            key = (serials[i], counters[i])
            amount, account = amount_list[i], accounts[i]
            packed_key = key[0] << 32 | key[1]
            if packed_key in self._seen or key in fresh:     # seen before: journaled
                prior = fresh.get(key) or self._accepted.get(key)
                if prior is not None and prior.token == raw[i]:
                    receipts[i] = self._receipt(prior, duplicate=True)  # a double tap
                else:               # other bytes, or journaled long ago: a clone
                    reasons[i] = Reason.ALREADY_ACCEPTED
                continue
            if amount > cap:
                reasons[i] = Reason.OVER_TRANSACTION_CAP
                continue
            if stale_cap is not None and amount > stale_cap:
                reasons[i] = Reason.DENY_LIST_STALE
                continue
            spent = self._spend.get(account, no_spend)
            extra = pending.get(account, no_spend)
            if spent.amount + extra.amount + amount > limits[i]:
                reasons[i] = Reason.OVER_OFFLINE_LIMIT
                continue
            if spent.uses + extra.uses + 1 > max_uses:
                reasons[i] = Reason.TOO_MANY_OFFLINE_USES
                continue
            record = Record(seq, key[0], key[1], account, amount, scene_value, t, raw[i])
            seq += 1
            if extra is no_spend:     # only accepted tokens get a spend entry
                extra = pending[account] = _Spend()
            extra.amount += amount
            extra.uses += 1
            fresh[key] = record
            packed.append(packed_key)
            new.append(record)
            receipts[i] = Receipt(self.id, record.seq, account, key[0], key[1], amount, scene,
                                  t)

        if new:
            # The acknowledgement point. The floor is the latest scan journaled,
            # so it moves only with a commit: a refused-only batch read on a
            # wrong clock cannot lock the gateway out.
            self._write(lambda: journal.append(new), record=new[0].seq)
            # Only now, after the commit, does memory change.
            self._floor = max(self._floor, t)
            self._next_record = seq
            self._accepted.update(fresh)
            self._seen.update(packed)
            for account, extra in pending.items():
                s = self._spend.setdefault(account, _Spend())
                s.amount += extra.amount
                s.uses += extra.uses
            self._save_anchor(sync=False)   # one small pwrite: the anchor keeps up
        return ScanResult(reasons, receipts)

    def _receipt(self, r: Record, duplicate: bool = False) -> Receipt:
        return Receipt(self.id, r.seq, r.account, r.serial, r.counter, r.amount,
                       Scene(r.scene), r.gateway_time, duplicate)

    # -- upload ------------------------------------------------------------------------

    def export_batch(self, max_records: int = 1000, now: float | None = None) -> bytes | None:
        """The next signed upload batch (msgpack), or None if nothing is
        waiting. Until it is acked, calling again returns the same bytes."""
        _args.integer("max_records", max_records, 1, 2**31)
        with self._mutex:
            journal = self._ready()
            waiting = journal.batches("acked = 0")
            if waiting:
                return waiting[0].body
            records = journal.records(after_seq=self._exported_through, limit=max_records)
            if not records:
                return None
            seq = self._next_batch
            body = sign_document(self.key, TAG_BATCH, {
                "v": BATCH_FORMAT, "gateway": self.key.public.to_bytes(), "seq": seq,
                "first": records[0].seq, "last": records[-1].seq,
                "created_at": self._read_clock(now),
                "records": [[r.seq, r.token, r.amount, r.scene, r.gateway_time]
                            for r in records],
            })
            batch = Batch(seq, records[0].seq, records[-1].seq, body, False)
            self._write(lambda: journal.add_batch(batch), batch=seq)
            self._next_batch = seq + 1
            self._exported_through = records[-1].seq
            self._save_anchor(sync=True)
            return body

    def ack(self, batch_seq: int) -> None:
        """Settlement has batch `batch_seq`: its records stop counting against
        the offline caps, and then `prune` runs. Acking an acked batch again
        (or one pruned since) only runs `prune`."""
        if not isinstance(batch_seq, int) or isinstance(batch_seq, bool) or not (
                0 < batch_seq < 2**63):
            raise InvalidArgument(f"batch_seq is a batch number, not {batch_seq!r:.80}")
        with self._mutex:
            journal = self._ready()
            found = journal.batches("seq = ?", (batch_seq,))
            batch = found[0] if found else None
            if batch is None and not 0 < batch_seq < self._next_batch:
                raise InvalidArgument(f"no exported batch {batch_seq}")
            # (Numbers below _next_batch were all exported, or lost before a
            # recovery; only pruning deletes one.)
            if batch is None or batch.acked:
                # Acked before (and maybe pruned since): a retry. Time may have
                # moved on since the first ack, so pruning may have more to do.
                self.prune()
                return
            self._write(lambda: journal.ack_batch(batch_seq))
            for r in journal.records(after_seq=batch.first - 1,
                                     limit=batch.last - batch.first + 1):
                s = self._spend.get(r.account)
                if s is not None:
                    s.amount -= r.amount
                    s.uses -= 1
                    if s.uses == 0:
                        del self._spend[r.account]
            self._acked_through = max(self._acked_through, batch.last)
            self._save_anchor(sync=True)
            self.prune()

    def prune(self) -> int:
        """Delete acknowledged payments scanned more than `policy.prune_after`
        seconds before the trusted time floor, oldest upload batch first, in
        one durable transaction; `ack` calls it. Returns how many records went.
        Unacknowledged payments are never deleted, and tokens issued at or
        before the newest deleted one are refused from then on (TOKEN_STALE),
        so forgetting a payment cannot let its token be accepted again."""
        # Acked records older than the replay window can no longer come back as
        # a fresh double tap: their full records leave memory (this covers every
        # record pruned below); their (serial, counter) stays in `_seen` while
        # they are journaled.
        with self._mutex:
            journal = self._ready()
            horizon = self._floor - self.policy.replay_window
            for key in [k for k, r in self._accepted.items()
                        if r.seq <= self._acked_through and r.gateway_time < horizon]:
                del self._accepted[key]
            before = self._floor - self.policy.prune_after
            pruned = self._write(lambda: journal.prune(before))
            if pruned is None:
                return 0
            self._seen -= pruned.keys
            self._forgotten = pruned.newest_issued_at
            return pruned.records

    def unacked_records(self) -> int:
        """How many records settlement does not hold yet as far as this
        gateway knows: scanned after the last acked batch, or in an older
        batch not acked."""
        with self._mutex:
            journal = self._ready()
            behind = sum(b.last - b.first + 1 for b in journal.batches("acked = 0")
                         if b.last <= self._acked_through)
            return max(0, self._next_record - 1 - self._acked_through) + behind

    def sync(self, client: SettlementClient, *, now: float | None = None,
             max_records: int = 1000, max_batches: int | None = None) -> SyncReport:
        """Online: upload the waiting batches to the settlement service, ack
        each one it holds, and fetch its deny list (qrpay.sync.sync; needs
        httpx). Offline, the batches stay queued: `report.online` is False."""
        from qrpay.sync import sync
        report = sync(self, client, now=now, max_records=max_records, max_batches=max_batches)
        if report.online and not report.problems:
            self._note_sync(now)
        return report

    def _note_sync(self, now: float | None) -> None:
        """Keep the time of this sync in the journal (LAST_SYNC_KEY), for
        `qrpay gateway status`. Best effort: the sync itself is done."""
        with self._mutex:
            try:
                journal = self._ready()
                t = self._read_clock(now)
                self._write(lambda: journal.set(LAST_SYNC_KEY, t))
            except (JournalUnavailable, ClockUntrusted):
                pass

    def records(self) -> list[Record]:
        """Every record still in the journal, in order (for audits and tests):
        all but those `prune` deleted."""
        with self._mutex:
            return self._ready().records()

    def close(self) -> None:
        """Sync the anchor and release the journal and the directory. A
        second close does nothing."""
        with self._mutex:
            if self._opened and self._journal is not None and self._doubt is None:
                self._save_anchor(sync=True)
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if self._anchor is not None:
                self._anchor.close()
                self._anchor = None
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _lock_directory(directory: Path) -> IO[bytes] | None:
    """One process per gateway directory: a second opener fails at once."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    try:
        handle = open(directory / LOCK_FILE, "ab")
    except OSError as exc:
        raise JournalUnavailable(f"cannot open {directory / LOCK_FILE}: {exc}") from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise JournalUnavailable(f"{directory} is in use by another gateway process") from None
    return handle


def _is_time(value: object) -> bool:
    """Unix seconds a gateway can work with: a finite real number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and 0 <= value <= MAX_TIME


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _behind(path: Path, anchor: Anchor, what: str) -> str:
    return (f"{path} {what}; its anchor says the gateway journaled records up to "
            f"{anchor.last_record} and batches up to {anchor.last_batch}. The gateway will not "
            "start from less, or tokens it accepted before would pass again. Restore the journal "
            "(journal.sqlite3 with its -wal file) from a backup, or run `qrpay gateway recover` "
            "to go on from what is left (docs/GATEWAY.md, Failure modes).")


def _as_bytes(tokens: Sequence[ScanInput]) -> tuple[list[bytes], npt.NDArray[np.bool_]]:
    """Token bytes, decoding text forms; a text that does not decode becomes
    an empty token flagged in the mask (reported as MALFORMED_TEXT)."""
    out: list[bytes] = []
    bad = np.zeros(len(tokens), dtype=np.bool_)
    for i, t in enumerate(tokens):
        if isinstance(t, str):
            try:
                out.append(decode_text(t))
            except MalformedText:
                out.append(b"")
                bad[i] = True
        elif isinstance(t, (bytes, bytearray, memoryview)):
            out.append(bytes(t))
        else:
            raise InvalidArgument("tokens are bytes or their text form")
    return out, bad

