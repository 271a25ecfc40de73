"""The archive of closed periods: Parquet (pyarrow) against .npy (numpy alone)
on one day shaped like settlement's records, 1,000,000 rows.

Columns: record u8, serial u8, counter u4, account u8, amount u4, scene u1,
reason u1, gateway_time u4, issued_at u4, limit u4, token_id u8,
uploaded_at u4, gateway (str: one of 20 16-hex-digit ids) and token (204
random bytes each, incompressible like real signatures, as settlement stores
them: a 2-D uint8 array, a fixed-width column).

Timed, each in this one run: write_period (fsyncs included) in "npy" and in
"parquet" with zstd (level 1, what qrpay writes) and with snappy (the other
codec considered), and read_period of each; the bytes on disk go in
extra_info. Every write is read back once, untimed, and compared value for
value. A figure, not a target: pyarrow's import time (a fresh interpreter
importing qrpay.archive and pyarrow.parquet, against one importing
qrpay.archive alone) and the size of its installed package. The ratios to npy
are printed at the end of the module.

Periods go to pytest's tmp_path, or under $QRPAY_BENCH_ARCHIVE_DIR (point it
at the storage the archive would use: the writes are fsynced). Each write
round writes about 250 MB; three rounds per benchmark:

    python -m pytest benchmarks/test_bench_archive.py    # about a minute
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qrpay import archive

ROWS = 1_000_000
TOKEN_LEN = 204   # qrpay.format.TOKEN_LEN
GATEWAYS = 20
ROUNDS = 3
SEED = 20270115
CODECS = {"npy": ("npy", None, None), "parquet_zstd": ("parquet", "zstd", 1),
          "parquet_snappy": ("parquet", "snappy", None)}
FIGURES: dict[str, float] = {}   # median seconds / bytes, by name, for the closing lines


def _day() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    n = ROWS
    times = np.sort(rng.integers(1_800_000_000, 1_800_086_400, n, dtype=np.uint32))
    ids = np.empty(GATEWAYS, dtype=object)
    ids[:] = [rng.bytes(8).hex() for _ in range(GATEWAYS)]
    tokens = rng.integers(0, 256, (n, TOKEN_LEN), dtype=np.uint8)
    return {"records": {
        "record": np.arange(1, n + 1, dtype=np.uint64),
        "serial": rng.integers(1_000, 101_000, n, dtype=np.uint64),
        "counter": rng.integers(1, 5_000, n, dtype=np.uint32),
        "account": rng.integers(10_000, 110_000, n, dtype=np.uint64),
        "amount": rng.integers(100, 3_000, n, dtype=np.uint32),
        "scene": rng.integers(1, 7, n, dtype=np.uint8),
        "reason": (rng.random(n) < 0.001).astype(np.uint8) * 7,
        "gateway_time": times,
        "issued_at": times - rng.integers(0, 60, n, dtype=np.uint32),
        "limit": rng.choice(np.array([2_000, 5_000, 10_000], dtype=np.uint32), n),
        "token_id": rng.integers(0, 2**63, n, dtype=np.uint64),
        "uploaded_at": times + rng.integers(0, 900, n, dtype=np.uint32),
        "gateway": ids[rng.integers(0, GATEWAYS, n)],
        "token": tokens,
    }}


@pytest.fixture(scope="module")
def day() -> dict[str, dict[str, np.ndarray]]:
    return _day()


@pytest.fixture(scope="module")
def where(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = os.environ.get("QRPAY_BENCH_ARCHIVE_DIR")
    path = Path(tempfile.mkdtemp(dir=base)) if base else tmp_path_factory.mktemp("archive")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def closing_lines(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or "write_npy" not in FIGURES:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        _closing_lines(reporter)


def _closing_lines(reporter: Any) -> None:
    reporter.write_line("")
    reporter.write_sep("-", f"archive, {ROWS:,} settlement rows (medians of this run)")
    for codec in CODECS:
        if f"write_{codec}" not in FIGURES:
            continue
        write, read = FIGURES[f"write_{codec}"], FIGURES.get(f"read_{codec}", float("nan"))
        size = FIGURES[f"bytes_{codec}"]
        reporter.write_line(
            f"  {codec:<15} write {write:6.3f} s ({write / FIGURES['write_npy']:4.2f}x npy)  "
            f"read {read:6.3f} s ({read / FIGURES.get('read_npy', float('nan')):4.2f}x npy)  "
            f"{size / 1e6:7.1f} MB ({size / FIGURES['bytes_npy']:4.2f}x npy; without "
            f"the tokens {FIGURES[f'bytes_{codec}_no_token'] / 1e6:5.1f} MB)")
    if "import_pyarrow" in FIGURES:
        reporter.write_line(
            f"  pyarrow: import adds {FIGURES['import_pyarrow'] * 1e3:.0f} ms to a fresh "
            f"`import qrpay.archive` ({FIGURES['import_archive'] * 1e3:.0f} ms); installed "
            f"{FIGURES['pyarrow_mb']:.0f} MB")


def _configure(monkeypatch: pytest.MonkeyPatch, codec: str) -> str:
    fmt, compression, level = CODECS[codec]
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
        monkeypatch.setattr(archive, "PARQUET_COMPRESSION", compression)
        monkeypatch.setattr(archive, "PARQUET_COMPRESSION_LEVEL", level)
    return fmt


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def _check(got: dict[str, dict[str, np.ndarray]], want: dict[str, dict[str, np.ndarray]]
           ) -> None:
    for name, values in want["records"].items():
        out = got["records"][name]
        assert out.dtype == values.dtype, name
        if values.dtype == object:
            assert out.tolist() == values.tolist(), name
        elif values.ndim == 2:
            assert out.shape == values.shape and out.tobytes() == values.tobytes(), name
        else:
            assert np.array_equal(out, values), name


@pytest.mark.parametrize("codec", list(CODECS))
def test_archive_write(benchmark: Any, day: Any, where: Path, codec: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _configure(monkeypatch, codec)
    root = where / f"write-{codec}"
    numbers = iter(range(1_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        shutil.rmtree(root, ignore_errors=True)   # the previous round's period
        return (root, next(numbers), day, b"summary"), {"format": fmt}

    path = benchmark.pedantic(archive.write_period, setup=setup, rounds=ROUNDS)
    tables, summary = archive.read_period(root, archive.list_periods(root)[0])
    _check(tables, day)
    assert summary == b"summary"
    size = _size(path)
    # The same day without its token column: what the numbers cost on disk.
    no_token = {"records": {k: v for k, v in day["records"].items() if k != "token"}}
    small = archive.write_period(where / f"no-token-{codec}", 1, no_token, b"", format=fmt)
    benchmark.extra_info.update(rows=ROWS, bytes=size, bytes_no_token=_size(small))
    FIGURES[f"write_{codec}"] = benchmark.stats.stats.median
    FIGURES[f"bytes_{codec}"] = size
    FIGURES[f"bytes_{codec}_no_token"] = _size(small)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("codec", list(CODECS))
def test_archive_read(benchmark: Any, day: Any, where: Path, codec: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = _configure(monkeypatch, codec)
    root = where / f"read-{codec}"
    archive.write_period(root, 1, day, b"summary", format=fmt)
    tables, summary = benchmark.pedantic(archive.read_period, args=(root, 1), rounds=ROUNDS)
    _check(tables, day)
    assert summary == b"summary"
    FIGURES[f"read_{codec}"] = benchmark.stats.stats.median
    shutil.rmtree(root, ignore_errors=True)


def _fresh_import(code: str, runs: int = 5) -> float:
    """Median wall time of a fresh interpreter running `code`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_pyarrow_cost() -> None:
    spec = importlib.util.find_spec("pyarrow")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pyarrow is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    libs = package.parent / "pyarrow.libs"   # vendored shared libraries, where wheels have them
    FIGURES["pyarrow_mb"] = sum(p.stat().st_size for folder in (package, libs)
                                if folder.is_dir() for p in folder.rglob("*") if p.is_file()) / 1e6
    base = _fresh_import("import qrpay.archive")
    FIGURES["import_archive"] = base
    FIGURES["import_pyarrow"] = _fresh_import(
        "import qrpay.archive, pyarrow.parquet; assert qrpay.archive.default_format() == 'parquet'"
    ) - base
