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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay import archive as archive_module
from qrpay.errors import InvalidArgument, Reason
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
    row in its records table, record number, reason), sorted."""

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


def _verify_part(root: str, period: int, start: int, stop: int, keys: _TrustKeys,
                 max_age: int, skew: int, threads: int
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.void]]:
    """Counts per reason and the failed rows of records[start:stop] of one period."""
    table = archive_module.read_columns(root, period, "records",
                                        ["token", "gateway_time", "record"])
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
    failed["row"] = bad + start
    failed["record"] = table["record"][start:stop][bad]
    failed["reason"] = reasons[bad]
    return counts, failed


# -- planning and gathering -----------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    period: int
    start: int
    stop: int


def _plan(root: str, periods: Iterable[int] | None, rows_per_task: int) -> tuple[
        tuple[int, ...], list[_Part]]:
    chosen = (archive_module.list_periods(root) if periods is None
              else sorted({_args.integer("period", p, 1, 2**62) for p in periods}))
    parts: list[_Part] = []
    for period in chosen:
        rows = archive_module.table_rows(root, period, "records")
        parts.extend(_Part(period, start, min(start + rows_per_task, rows))
                     for start in range(0, rows, rows_per_task))
    return tuple(chosen), parts


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
def _cluster(client: Any, workers: int) -> Iterator[Any]:
    """The client given, or a LocalCluster of `workers` processes (one
    thread each: verify_batch makes its own) for this call only."""
    if client is not None:
        yield client
        return
    if distributed is None:
        raise InvalidArgument("qrpay.scale needs dask.distributed: pip install 'qrpay[scale]'")
    workers = _args.integer("workers", workers, 1, 1024)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as local:
        yield local


def _arguments(archive: str | os.PathLike[str], rows_per_task: int, max_age: int, skew: int,
               threads: int) -> str:
    if not isinstance(archive, (str, os.PathLike)):
        raise InvalidArgument(f"archive is a folder, not {type(archive).__name__}")
    _args.integer("rows_per_task", rows_per_task, 1, 2**40)
    _args.integer("max_age", max_age, 0, 2**32)
    _args.integer("skew", skew, 0, 2**32)
    _args.threads(threads)
    return os.fspath(archive)


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
        futures = [dask.submit(_verify_part, root, p.period, p.start, p.stop, keys, max_age,
                               skew, threads, pure=False) for p in parts]
        results: list[Any] = [None] * len(futures)
        index = {f.key: i for i, f in enumerate(futures)}
        for done, future in enumerate(distributed.as_completed(futures), 1):
            results[index[future.key]] = future.result()
            if progress is not None:
                progress(done, len(futures))
    return _combine(chosen, results)


def reverify_local(archive: str | os.PathLike[str], trust: TrustStore,
                   periods: Iterable[int] | None = None, *,
                   rows_per_task: int = ROWS_PER_TASK, max_age: int = DEFAULT_MAX_AGE,
                   skew: int = DEFAULT_SKEW, threads: int = 1) -> Reverified:
    """reverify in this process, partition after partition (no Dask)."""
    root = _arguments(archive, rows_per_task, max_age, skew, threads)
    keys = _trust_keys(trust)
    chosen, parts = _plan(root, periods, rows_per_task)
    return _combine(chosen, (_verify_part(root, p.period, p.start, p.stop, keys, max_age,
                                          skew, threads) for p in parts))


__all__: Sequence[str] = ("FAILED_DTYPE", "ROWS_PER_TASK", "Reverified", "reverify",
                          "reverify_local")
