"""Past one machine: work over the archive of closed periods on a Dask
cluster (dask.distributed; `pip install 'qrpay[scale]'`). docs/SCALE.md.

Each function takes a `distributed.Client` (any cluster: a LocalCluster of
worker processes, or `dask scheduler` and `dask worker` on many machines,
all reading the same archive folder), or starts a LocalCluster of
`workers` processes when given none, and returns exactly what the same
work done in one process returns (the `*_local` twins, which the tests
compare it with).

- reverify: every token of the chosen periods verified again, inside each
  partition with verify_batch (the GIL released, the issuer signatures
  cached per worker): counts per reason and the rows that fail.
- settle: the records of the chosen periods settled as one stream, sharded
  by account (and so by serial) across workers, each shard with the same
  numpy kernel: charges, findings and credit histories.
- score: every account's credit history scored with a card in the compiled
  core, limits from a policy, written as Parquet per shard, with the PSI per
  feature against the last run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args, credit, scorefit, tokenspool
from qrpay import archive as archive_module
from qrpay.credit import DEFAULT_DUE_AFTER
from qrpay.errors import InvalidArgument, Reason
from qrpay.ledger import RECORD_DTYPE, totals_by_account
from qrpay.periods import Carry, period_charges, settle_period
from qrpay.reports import (
    OVERSPEND, Finding, LateRows, holes_as_findings, keyed_findings, late_findings,
)
from qrpay.scoring import LimitPolicy, Scorecard
from qrpay.settlement import DEFAULT_HORIZON
from qrpay.token import DEFAULT_MAX_AGE, DEFAULT_SKEW, verify_batch
from qrpay.trust import Role, TrustStore

distributed: Any   # the extra (untyped); the *_local functions work without it
try:
    import distributed
except ImportError:  # pragma: no cover - depends on the install
    distributed = None

ROWS_PER_TASK = 1_000_000   # tokens a re-verify task checks: a day of a large city
REASONS = 64              # counts per reason code (Reason values are below this)
FAILED_DTYPE = np.dtype([("period", "<u4"), ("row", "<u8"), ("record", "<u8"),
                         ("reason", "u1")])
_TrustKeys = tuple[tuple[bytes, int, int, int], ...]


@dataclass(frozen=True)
class Reverified:
    """Every token of `periods` verified again: `counts[reason]` tokens
    per Reason code, and each one that failed (FAILED_DTYPE rows: period,
    row among its tokens tables read in name order, record number,
    reason), sorted."""

    periods: tuple[int, ...]
    tokens: int
    counts: npt.NDArray[np.int64] = field(repr=False)
    failed: npt.NDArray[np.void] = field(repr=False)

    def by_reason(self) -> dict[str, int]:
        return {Reason(code).name: int(n) for code, n in enumerate(self.counts.tolist()) if n}

    def same_as(self, other: Reverified) -> bool:
        return (self.periods == other.periods and self.tokens == other.tokens
                and self.counts.tolist() == other.counts.tolist()
                and self.failed.tobytes() == other.failed.tobytes())


# -- one partition (runs on a worker) -------------------------------------------------

_worker_trust: dict[_TrustKeys, TrustStore] = {}


def _trust_of(keys: _TrustKeys) -> TrustStore:
    """This process's TrustStore for `keys`, made once: its cache of
    verified credentials stays warm from one task to the next."""
    store = _worker_trust.get(keys)
    if store is None:
        from qrpay.keys import IssuerPublicKey
        store = TrustStore()
        for public, not_before, not_after, roles in keys:
            store.add(IssuerPublicKey(public), not_before, not_after, Role(roles))
        _worker_trust.clear()   # one trust at a time: the last job's
        _worker_trust[keys] = store
    return store


def _verify_part(root: str, period: int, name: str, offset: int, start: int, stop: int,
                 keys: _TrustKeys, max_age: int, skew: int, threads: int
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.void]]:
    """Counts per reason and the failed rows of rows start:stop of one
    tokens table of a period (`offset`: the rows of its tables before it)."""
    table = archive_module.read_columns(root, period, name, ["token", "gateway_time", "record"])
    tokens = np.ascontiguousarray(table["token"][start:stop])
    times = table["gateway_time"][start:stop].astype(np.int64)
    del table["token"]   # the rest of the period's tokens go now
    checked = verify_batch(tokens, _trust_of(keys), times, max_age=max_age, skew=skew,
                           threads=threads)
    reasons = checked.reasons
    counts = np.bincount(reasons, minlength=REASONS).astype(np.int64)
    bad = np.flatnonzero(reasons != Reason.OK)
    failed = np.zeros(len(bad), dtype=FAILED_DTYPE)
    failed["period"] = period
    failed["row"] = bad + start + offset
    failed["record"] = table["record"][start:stop][bad]
    failed["reason"] = reasons[bad]
    return counts, failed


# -- planning and gathering -----------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    period: int
    table: str
    offset: int
    start: int
    stop: int


def token_tables(root: str, period: int) -> list[tuple[str, int]]:
    """The tables holding a period's tokens and the rows of each, in order:
    its tokens_* tables (tokenspool.py); an archive written before them
    kept each token in the records table."""
    tables = archive_module.table_names(root, period)
    parts = sorted((name, rows) for name, rows in tables.items() if tokenspool.is_part(name))
    return parts or [("records", tables.get("records", 0))]


def _chosen(root: str, periods: Iterable[int] | None) -> tuple[int, ...]:
    """The periods asked for, sorted (every archived one for None)."""
    return tuple(archive_module.list_periods(root) if periods is None
                 else sorted({_args.integer("period", p, 1, 2**62) for p in periods}))


def _plan(root: str, periods: Iterable[int] | None, rows_per_task: int) -> tuple[
        tuple[int, ...], list[_Part]]:
    chosen = _chosen(root, periods)
    parts: list[_Part] = []
    for period in chosen:
        offset = 0
        for name, rows in token_tables(root, period):
            parts.extend(_Part(period, name, offset, start, min(start + rows_per_task, rows))
                         for start in range(0, rows, rows_per_task))
            offset += rows
    return chosen, parts


def _trust_keys(trust: TrustStore) -> _TrustKeys:
    if not isinstance(trust, TrustStore):
        raise InvalidArgument("trust is the TrustStore tokens are verified against")
    return tuple(sorted((e.key.to_bytes(), e.not_before, e.not_after, int(e.roles))
                        for e in trust))


def _combine(periods: tuple[int, ...],
             results: Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.void]]]
             ) -> Reverified:
    counts = np.zeros(REASONS, dtype=np.int64)
    failed = []
    for part_counts, part_failed in results:
        counts += part_counts
        failed.append(part_failed)
    rows = np.concatenate(failed) if failed else np.zeros(0, dtype=FAILED_DTYPE)
    rows = rows[np.lexsort((rows["row"], rows["period"]))]
    return Reverified(periods, int(counts.sum()), counts, rows)


@contextmanager
def local_cluster(workers: int = 2, memory_limit: str | None = None) -> Iterator[Any]:
    """A client of a LocalCluster of `workers` processes on this machine,
    one thread each (verify_batch makes its own), as the jobs here want it:
    no dashboard (no one would know its port) and no statistical profiler
    on the workers (it samples every worker's stack 100 times a second: CPU
    the jobs would rather have). `memory_limit` per worker, as Dask takes
    it ("2GiB"; default: the machine's memory shared out)."""
    if distributed is None:
        raise InvalidArgument("qrpay.scale needs dask.distributed: pip install 'qrpay[scale]'")
    workers = _args.integer("workers", workers, 1, 1024)
    import dask
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     memory_limit=memory_limit or "auto",
                                     dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


@contextmanager
def _cluster(client: Any, workers: int) -> Iterator[Any]:
    """The client given, or a local_cluster for this call only."""
    if client is not None:
        yield client
        return
    with local_cluster(workers) as local:
        yield local


def _gathered(futures: list[Any], progress: Callable[[int, int], None] | None,
              watched: list[Any] | None = None) -> list[Any]:
    """The results of `futures` in their order, gathered as they finish. A
    task whose worker died is run again by the scheduler; a task that raised
    raises here. `watched` holds the job's other tasks: counted in
    `progress(done, total)` (called after each task of either kind), and
    emptied here so that each one's result is let go as soon as no task
    needs it."""
    results: list[Any] = [None] * len(futures)
    index = {f.key: i for i, f in enumerate(futures)}
    total = len(futures) + len(watched or ())
    pending = distributed.as_completed(futures + (watched or []))
    if watched:
        watched.clear()
    for done, future in enumerate(pending, 1):
        slot = index.get(future.key)
        if slot is not None:
            results[slot] = future.result()
        if progress is not None:
            progress(done, total)
    return results


def _root(archive: str | os.PathLike[str], max_age: int, skew: int) -> str:
    if not isinstance(archive, (str, os.PathLike)):
        raise InvalidArgument(f"archive is a folder, not {type(archive).__name__}")
    _args.integer("max_age", max_age, 0, 2**32)
    _args.integer("skew", skew, 0, 2**32)
    return os.fspath(archive)


def _arguments(archive: str | os.PathLike[str], rows_per_task: int, max_age: int, skew: int,
               threads: int) -> str:
    _args.integer("rows_per_task", rows_per_task, 1, 2**40)
    _args.threads(threads)
    return _root(archive, max_age, skew)


# -- re-verify --------------------------------------------------------------------------

def reverify(archive: str | os.PathLike[str], trust: TrustStore,
             periods: Iterable[int] | None = None, *, client: Any = None, workers: int = 2,
             rows_per_task: int = ROWS_PER_TASK, max_age: int = DEFAULT_MAX_AGE,
             skew: int = DEFAULT_SKEW, threads: int = 1,
             progress: Callable[[int, int], None] | None = None) -> Reverified:
    """Verify every token of `periods` (all closed periods for None) again
    on the cluster, `rows_per_task` tokens a task, at the time its gateway
    scanned it. A task that dies with its worker is run again by Dask; the
    result is the same as reverify_local's. `progress(done, total)` is
    called as tasks finish."""
    root = _arguments(archive, rows_per_task, max_age, skew, threads)
    keys = _trust_keys(trust)
    chosen, parts = _plan(root, periods, rows_per_task)
    with _cluster(client, workers) as dask:
        futures = [dask.submit(_verify_part, root, p.period, p.table, p.offset, p.start, p.stop,
                               keys, max_age, skew, threads, pure=False) for p in parts]
        results = _gathered(futures, progress)
    return _combine(chosen, results)


def reverify_local(archive: str | os.PathLike[str], trust: TrustStore,
                   periods: Iterable[int] | None = None, *,
                   rows_per_task: int = ROWS_PER_TASK, max_age: int = DEFAULT_MAX_AGE,
                   skew: int = DEFAULT_SKEW, threads: int = 1) -> Reverified:
    """reverify in this process, partition after partition (no Dask)."""
    root = _arguments(archive, rows_per_task, max_age, skew, threads)
    keys = _trust_keys(trust)
    chosen, parts = _plan(root, periods, rows_per_task)
    return _combine(chosen, (_verify_part(root, p.period, p.table, p.offset, p.start, p.stop,
                                          keys, max_age, skew, threads) for p in parts))


# -- settle across periods ------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveSettlement:
    """The archive's records of `periods` settled as one stream (in period
    order, then arrival order), as a fresh store would settle them: charges
    per account, findings in report order (record gaps from the record
    numbers per gateway; batch numbers are not in the archive), and the
    credit history of every account at `now` against the repayments the
    periods archived."""

    periods: tuple[int, ...]
    records: int
    charged_total: int
    rejected_total: int
    accounts: npt.NDArray[np.uint64] = field(repr=False)
    amounts: npt.NDArray[np.int64] = field(repr=False)
    counts: npt.NDArray[np.int64] = field(repr=False)
    findings: list[Finding] = field(repr=False)
    history: npt.NDArray[np.void] = field(repr=False)   # credit.CREDIT_DTYPE, by account

    def same_as(self, other: ArchiveSettlement) -> bool:
        return (self.periods == other.periods and self.records == other.records
                and self.charged_total == other.charged_total
                and self.rejected_total == other.rejected_total
                and self.accounts.tolist() == other.accounts.tolist()
                and self.amounts.tolist() == other.amounts.tolist()
                and self.counts.tolist() == other.counts.tolist()
                and self.findings == other.findings
                and self.history.tobytes() == other.history.tobytes())


_RECORD_COLUMNS = list(RECORD_DTYPE.names or ())
_SHARD_MIX = np.uint64(0x9E3779B97F4A7C15)   # Fibonacci hashing: accounts spread evenly


def _shard_of(account: npt.NDArray[np.uint64], shards: int) -> npt.NDArray[np.int64]:
    mixed = (account.astype(np.uint64) * _SHARD_MIX) >> np.uint64(32)
    return (mixed % np.uint64(shards)).astype(np.int64)


@dataclass(frozen=True)
class _ShardResult:
    records: int
    rejected: int
    accounts: npt.NDArray[np.uint64]
    amounts: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    keyed: list[tuple[int, int, Finding]]
    late: LateRows
    history: npt.NDArray[np.void]


@dataclass(frozen=True)
class _Slice:
    """One shard's rows of one period: its records, their gateways (codes
    into `names`), their rows in the whole stream, and its repayments
    (account, amount, paid_at)."""

    records: npt.NDArray[np.void]
    gateway: npt.NDArray[np.int32]
    names: tuple[str, ...]
    rows: npt.NDArray[np.int64]
    paid: npt.NDArray[np.int64]


_Covered = dict[str, list[tuple[int, int]]]


def _split_period(root: str, period: int, offset: int, shards: int
                  ) -> tuple[list[_Slice], _Covered]:
    """Read one period once and cut it into its `shards` slices (by a hash
    of the account: a serial belongs to one account, so every check, copies
    and clones and overspend by serial, credit by account, finds all it
    needs in one shard); and the runs of record numbers per gateway it
    holds, for the sequence gaps. `offset` is its first row in the stream."""
    table = archive_module.read_columns(root, period, "records", [*_RECORD_COLUMNS, "gateway"])
    names, inverse = np.unique(table["gateway"].astype(str), return_inverse=True)
    codes: npt.NDArray[np.int32] = inverse.astype(np.int32).reshape(-1)
    shard = _shard_of(table["account"], shards)
    repaid = archive_module.read_period(root, period, ["repayments"])[0]["repayments"]
    paid = np.stack([repaid[c].astype(np.int64) for c in ("account", "amount", "paid_at")],
                    axis=1).reshape(-1, 3)
    paid_shard = _shard_of(paid[:, 0].astype(np.uint64), shards)
    slices = []
    for k in range(shards):
        mine = np.flatnonzero(shard == k)
        part = np.zeros(len(mine), dtype=RECORD_DTYPE)
        for name in _RECORD_COLUMNS:
            part[name] = table[name][mine]
        slices.append(_Slice(part, codes[mine], tuple(names.tolist()), mine + offset,
                             paid[paid_shard == k]))
    covered: _Covered = {}
    for code, name in enumerate(names.tolist()):
        numbers = np.unique(table["record"][codes == code].astype(np.int64))
        breaks = np.flatnonzero(np.diff(numbers) != 1)
        starts = np.r_[numbers[:1], numbers[breaks + 1]]
        ends = np.r_[numbers[breaks], numbers[-1:]]
        covered[str(name)] = list(zip(starts.tolist(), ends.tolist()))
    return slices, covered


def _slice_of(split: tuple[list[_Slice], _Covered], shard: int) -> _Slice:
    return split[0][shard]


def _covered_of(split: tuple[list[_Slice], _Covered]) -> _Covered:
    return split[1]


def _settle_slices(slices: list[_Slice], slack: int, now: int, due_after: int) -> _ShardResult:
    """One shard settled over every period (its slices, in period order)."""
    records = (np.concatenate([s.records for s in slices]) if slices
               else np.zeros(0, dtype=RECORD_DTYPE))
    gateway = (np.concatenate([np.asarray(s.names, dtype=object)[s.gateway] if len(s.names)
                               else np.zeros(0, dtype=object) for s in slices])
               if slices else np.zeros(0, dtype=object))
    row = np.concatenate([s.rows for s in slices]) if slices else np.zeros(0, dtype=np.int64)
    settled = settle_period(Carry.empty(), records, gateway, slack)
    charged = settled.result.charged
    accounts, amounts, counts = totals_by_account(records, charged)
    keyed, late = keyed_findings(settled)
    # Rows of this shard are rows of the whole stream (period, then arrival).
    keyed = [(g, int(row[k]) if g != OVERSPEND else k, f) for g, k, f in keyed]
    late = [(name, int(row[i]), record, amount) for name, i, record, amount in late]
    charges = period_charges(settled)
    pay = (np.concatenate([s.paid for s in slices]) if slices
           else np.zeros((0, 3), dtype=np.int64))
    history = credit.history(charges["account"], charges["time"], charges["amount"],
                             pay[:, 0].astype(np.uint64), pay[:, 2], pay[:, 1], now, due_after)
    rejected = int(records["amount"][~charged].astype(np.int64).sum())
    return _ShardResult(len(records), rejected, accounts, amounts, counts, keyed, late, history)


def _offsets(root: str, periods: tuple[int, ...]) -> list[int]:
    """Each period's first row in the stream of all of them."""
    sizes = [archive_module.table_rows(root, p, "records") for p in periods]
    return np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64).tolist() if sizes else []


@dataclass
class _Shuffle:
    """The futures of a job sharded by account: one per shard (the tasks
    submit_shard made), the covered record runs of each period (settle's gaps), and
    the split and slice tasks between (`steps`, for progress only)."""

    shards: list[Any]
    covered: list[Any]
    steps: list[Any]


def _shuffled(dask: Any, root: str, periods: tuple[int, ...], shards: int, covered: bool,
              submit_shard: Callable[[int, list[Any]], Any]) -> _Shuffle:
    """On the cluster: each period read and split once, and each shard's
    task submitted by `submit_shard(shard, slices)` with the futures of that
    shard's slice of every period (the scheduler moves each slice to where
    its shard runs)."""
    splits = [dask.submit(_split_period, root, p, offset, shards, pure=False)
              for p, offset in zip(periods, _offsets(root, periods))]
    slices = [[dask.submit(_slice_of, split, k, pure=False) for split in splits]
              for k in range(shards)]
    return _Shuffle([submit_shard(k, slices[k]) for k in range(shards)],
                    [dask.submit(_covered_of, split, pure=False) for split in splits] if covered
                    else [],
                    splits + [f for shard in slices for f in shard])


def _gaps(covered: Iterable[dict[str, list[tuple[int, int]]]]) -> list[Finding]:
    """sequence_gap findings from the runs of every period: what no run
    covers, from record 1."""
    runs: dict[str, list[tuple[int, int]]] = {}
    for part in covered:
        for name, spans in part.items():
            runs.setdefault(name, []).extend(spans)
    holes: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
    for name, spans in runs.items():
        missing, upto = [], 0
        for start, end in sorted(spans):
            if start > upto + 1:
                missing.append((upto + 1, start - 1))
            upto = max(upto, end)
        if missing:
            holes[name] = (missing, [])
    return holes_as_findings(holes)


def _merged(periods: tuple[int, ...], shards: list[_ShardResult], gaps: list[Finding],
            horizon: int) -> ArchiveSettlement:
    accounts = np.concatenate([s.accounts for s in shards])
    order = np.argsort(accounts, kind="stable")
    amounts = np.concatenate([s.amounts for s in shards])[order]
    counts = np.concatenate([s.counts for s in shards])[order]
    keyed = sorted((k for s in shards for k in s.keyed), key=lambda k: (k[0], k[1]))
    late = [row for s in shards for row in s.late]
    findings = [f for _g, _k, f in keyed] + late_findings(late, horizon) + gaps
    history = np.concatenate([s.history for s in shards])
    history = history[np.argsort(history["account"], kind="stable")]
    return ArchiveSettlement(periods, sum(s.records for s in shards), int(amounts.sum()),
                      sum(s.rejected for s in shards), accounts[order], amounts, counts,
                      findings, history)


def _settle_arguments(archive: str | os.PathLike[str], shards: int, now: int, due_after: int,
                      max_age: int, skew: int, horizon: int) -> tuple[str, int]:
    root = _root(archive, max_age, skew)
    _args.integer("shards", shards, 1, 4096)
    _args.integer("now", now, 0, 2**40)
    _args.integer("due_after", due_after, 0, 2**40 - 1)
    _args.integer("horizon", horizon, 0, 2**32)
    return root, max_age + 2 * skew   # the slack settlement judges copies with


def settle(archive: str | os.PathLike[str], periods: Iterable[int] | None = None, *,
           now: int, client: Any = None, workers: int = 2, shards: int = 8,
           due_after: int = DEFAULT_DUE_AFTER, max_age: int = DEFAULT_MAX_AGE,
           skew: int = DEFAULT_SKEW, horizon: int = DEFAULT_HORIZON,
           progress: Callable[[int, int], None] | None = None) -> ArchiveSettlement:
    """Settle the archive's records of `periods` (all closed for None) as
    one stream on the cluster: `shards` tasks, each settling the accounts
    whose hash falls in it with the same numpy kernel, plus one task per
    period finding its record numbers; gathered into what settle_local
    returns. A shard holds about 1/shards of the records: more shards than
    workers keep each task within a worker's memory."""
    root, slack = _settle_arguments(archive, shards, now, due_after, max_age, skew, horizon)
    chosen = _chosen(root, periods)
    with _cluster(client, workers) as dask:
        job = _shuffled(dask, root, chosen, shards, True, lambda _shard, slices: dask.submit(
            _settle_slices, slices, slack, now, due_after, pure=False))
        results = _gathered(job.shards + job.covered, progress, job.steps)
    return _merged(chosen, results[:shards], _gaps(results[shards:]), horizon)


def settle_local(archive: str | os.PathLike[str], periods: Iterable[int] | None = None, *,
                 now: int, shards: int = 1, due_after: int = DEFAULT_DUE_AFTER,
                 max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW,
                 horizon: int = DEFAULT_HORIZON) -> ArchiveSettlement:
    """settle in this process (shards=1: the whole stream at once)."""
    root, slack = _settle_arguments(archive, shards, now, due_after, max_age, skew, horizon)
    chosen = _chosen(root, periods)
    splits = [_split_period(root, p, offset, shards)
              for p, offset in zip(chosen, _offsets(root, chosen))]
    return _merged(chosen, [_settle_slices([split[0][k] for split in splits], slack, now,
                                           due_after) for k in range(shards)],
                   _gaps(split[1] for split in splits), horizon)


# -- score everyone -------------------------------------------------------------------

BINS_FILE = "_bins.json"   # per-feature bin counts, the next run's PSI baseline (readers skip _files)


@dataclass(frozen=True)
class Scored:
    """A scoring run: `accounts` scored into `folder` (part-NNNNN.parquet,
    one per shard: account, score and the limit per scene), the count of
    accounts in each of the card's bins per feature, and the PSI of each
    feature against the run that wrote `folder` before (empty the first time)."""

    accounts: int
    folder: Path
    bins: dict[str, list[int]]
    psi: dict[str, float]


def _card_policy(card: Scorecard, policy: LimitPolicy) -> tuple[str, str]:
    if not isinstance(card, Scorecard) or not isinstance(policy, LimitPolicy):
        raise InvalidArgument("score takes a Scorecard and a LimitPolicy")
    fields = set(credit.CREDIT_DTYPE.names or ())
    unknown = [n for n in card.feature_names if n not in fields]
    if unknown:
        raise InvalidArgument(f"the card's features must be credit-history columns "
                              f"({', '.join(sorted(fields))}), not {', '.join(unknown)}")
    return card.to_json(), json.dumps(policy.as_dict())


def _score_slices(slices: list[_Slice], shard: int, slack: int, now: int, due_after: int,
                  card_json: str, policy_json: str, folder: str
                  ) -> tuple[int, dict[str, list[int]]]:
    """Settle one shard's accounts, score their credit histories with the
    card in the compiled core, give them the policy's limits and write them
    as part-SHARD.parquet; returns how many and the bin counts per feature."""
    pa, pq = _parquet()
    card = Scorecard.from_json(card_json)
    policy = LimitPolicy.from_dict(json.loads(policy_json))
    history = _settle_slices(slices, slack, now, due_after).history
    X = np.column_stack([history[name].astype(np.float64) for name in card.feature_names]
                        ) if len(card.feature_names) else np.zeros((len(history), 0))
    scores = card.score(X)
    limits = policy.limits(scores)
    table = pa.table({"account": history["account"], "score": scores,
                      **{f"limit_{scene.name.lower()}": limits[scene] for scene in limits}})
    final = Path(folder) / f"part-{shard:05d}.parquet"
    partial = final.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    os.replace(partial, final)   # a task run again after its worker died writes it whole
    bins = {}
    for f, feature in enumerate(card.features):
        codes = tuple(c for c, _points in feature.specials)
        size = len(feature.edges) + 2 + len(codes)
        index = scorefit._bin_index(X[:, f], feature.edges, codes)
        bins[feature.name] = np.bincount(index, minlength=size).tolist()
    return len(history), bins


def _parquet() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet): scores are written as Parquet."""
    found = archive_module._pyarrow()
    if found is None:
        raise InvalidArgument("scoring writes Parquet: pip install 'qrpay[scale]' (pyarrow)")
    return found


def _psi_of_counts(expected: list[int], actual: list[int]) -> float:
    pe = np.maximum(np.asarray(expected, dtype=np.float64) / max(sum(expected), 1), 1e-4)
    pa = np.maximum(np.asarray(actual, dtype=np.float64) / max(sum(actual), 1), 1e-4)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def _scored(folder: Path, results: list[tuple[int, dict[str, list[int]]]]) -> Scored:
    """Add up the shards' bins, compare them with the last run's, keep them."""
    bins: dict[str, list[int]] = {}
    for _count, part in results:
        for name, counts in part.items():
            bins[name] = [a + b for a, b in zip(bins.get(name, [0] * len(counts)), counts)]
    psi = {}
    baseline = folder / BINS_FILE
    if baseline.exists():
        before = json.loads(baseline.read_text())
        psi = {name: _psi_of_counts(before[name], counts) for name, counts in bins.items()
               if name in before and len(before[name]) == len(counts)}
    partial = baseline.with_suffix(".json.partial")
    partial.write_text(json.dumps(bins))
    os.replace(partial, baseline)
    return Scored(sum(count for count, _bins in results), folder, bins, psi)


def _score_plan(archive: str | os.PathLike[str], periods: Iterable[int] | None,
                folder: str | os.PathLike[str], shards: int, now: int, due_after: int,
                card: Scorecard, policy: LimitPolicy) -> tuple[str, tuple[int, ...], int, Path,
                                                               tuple[str, str]]:
    root, slack = _settle_arguments(archive, shards, now, due_after, DEFAULT_MAX_AGE,
                                    DEFAULT_SKEW, DEFAULT_HORIZON)
    documents = _card_policy(card, policy)
    _parquet()
    if not isinstance(folder, (str, os.PathLike)):
        raise InvalidArgument(f"out is a folder, not {type(folder).__name__}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):   # the last run's parts; its bins stay
        old.unlink()
    chosen = _chosen(root, periods)
    return root, chosen, slack, out, documents


def score(archive: str | os.PathLike[str], card: Scorecard, policy: LimitPolicy,
          out: str | os.PathLike[str], periods: Iterable[int] | None = None, *, now: int,
          client: Any = None, workers: int = 2, shards: int = 8,
          due_after: int = DEFAULT_DUE_AFTER,
          progress: Callable[[int, int], None] | None = None) -> Scored:
    """Score every account of the archive on the cluster: its credit
    history at `now` (as settle works it out, by shard), scored with `card`
    in the compiled core, limits from `policy`, written to `out` as Parquet
    (one file per shard), with the PSI per feature against the last run
    written to `out`."""
    root, chosen, slack, folder, (card_json, policy_json) = _score_plan(
        archive, periods, out, shards, now, due_after, card, policy)
    with _cluster(client, workers) as dask:
        job = _shuffled(dask, root, chosen, shards, False, lambda shard, slices: dask.submit(
            _score_slices, slices, shard, slack, now, due_after, card_json, policy_json,
            str(folder), pure=False))
        results = _gathered(job.shards, progress, job.steps)
    return _scored(folder, results)


def score_local(archive: str | os.PathLike[str], card: Scorecard, policy: LimitPolicy,
                out: str | os.PathLike[str], periods: Iterable[int] | None = None, *,
                now: int, shards: int = 1, due_after: int = DEFAULT_DUE_AFTER) -> Scored:
    """score in this process."""
    root, chosen, slack, folder, (card_json, policy_json) = _score_plan(
        archive, periods, out, shards, now, due_after, card, policy)
    splits = [_split_period(root, p, offset, shards)
              for p, offset in zip(chosen, _offsets(root, chosen))]
    return _scored(folder, [_score_slices([split[0][k] for split in splits], k, slack, now,
                                          due_after, card_json, policy_json, str(folder))
                            for k in range(shards)])


__all__: Sequence[str] = ("FAILED_DTYPE", "ROWS_PER_TASK", "ArchiveSettlement", "Reverified",
                          "Scored", "local_cluster", "reverify", "reverify_local", "score",
                          "score_local", "settle", "settle_local")
