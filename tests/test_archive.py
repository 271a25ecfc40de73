"""The archive of closed periods (qrpay.archive): every column kind round-trips
in both formats; a crash at any fsync leaves the whole period or none of it
(and the next write cleans up); tampering with any file is found and named; a
closed period is never overwritten; the Parquet files are plain ones; and
`import qrpay.archive` works where pyarrow does not."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qrpay import archive
from qrpay.archive import (
    list_periods, period_dir, read_period, verify_period, write_period,
)
from qrpay.errors import ArchiveUnavailable, InvalidArgument, PeriodClosed
from qrpay.wire import pack, unpack_strict

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HAVE_PARQUET = "parquet" in archive.available_formats()
FORMATS = [pytest.param("npy"), pytest.param(
    "parquet", marks=pytest.mark.skipif(not HAVE_PARQUET, reason="pyarrow is not installed"))]
NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float32", "float64"]
SRC = str(Path(archive.__file__).resolve().parents[1])
MANIFEST_NAME = archive.MANIFEST


def objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def assert_same(got: dict[str, dict[str, np.ndarray]], want: dict[str, dict[str, np.ndarray]]
                ) -> None:
    assert list(got) == list(want)
    for table, columns in want.items():
        assert list(got[table]) == list(columns), table
        for name, values in columns.items():
            out = got[table][name]
            assert out.dtype == values.dtype and out.shape == values.shape, (table, name)
            if values.dtype == object:
                assert [type(v) for v in out] == [type(v) for v in values], (table, name)
                assert out.tolist() == values.tolist(), (table, name)
            else:   # bit for bit: NaN payloads and -0.0 too
                assert out.tobytes() == values.tobytes(), (table, name)


def settlement_like(rows: int, seed: int = 7) -> dict[str, dict[str, np.ndarray]]:
    """Two tables shaped like a settled day: every kind the archive stores."""
    rng = np.random.default_rng(seed)
    gateways = [rng.bytes(8).hex() for _ in range(3)] + ["gw-Zürich-🚌"]
    tokens = [rng.bytes(int(n)) for n in rng.integers(0, 40, rows)]
    tokens[: min(rows, 3)] = [b"", b"\0", b"tok\0\0"][: min(rows, 3)]
    return {
        "records": {
            "record": np.arange(rows, dtype=np.uint64) + 2**63,
            "amount": rng.integers(0, 2**32, rows, dtype=np.uint32),
            "scene": rng.integers(0, 256, rows, dtype=np.uint8),
            "gateway": objects([gateways[i] for i in rng.integers(0, 4, rows)]),
            "token": objects(tokens),
        },
        "findings": {
            "flag": rng.integers(0, 2, rows).astype(bool),
            "delta": rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64),
            "share": np.array([np.nan, -0.0, np.inf, 1e-310][:rows] + [0.5] * max(0, rows - 4)),
        },
    }


# --------------------------------------------------------------------------
# Round trips.

@st.composite
def table_sets(draw: st.DrawFn) -> dict[str, dict[str, np.ndarray]]:
    tables = {}
    for t in range(draw(st.integers(1, 3))):
        rows = draw(st.integers(0, 12))
        columns = {}
        for i, kind in enumerate(draw(st.lists(st.sampled_from(NUMERIC + ["bytes", "str"]),
                                               min_size=1, max_size=4))):
            if kind == "bytes":
                item = st.binary(max_size=40) | st.sampled_from([b"", b"\0", b"a\0", b"\0\0b"])
                values = objects(draw(st.lists(item, min_size=rows, max_size=rows)))
            elif kind == "str":
                values = objects(draw(st.lists(st.text(max_size=20), min_size=rows,
                                               max_size=rows)))
            else:
                values = draw(hnp.arrays(np.dtype(kind), rows))
            columns[f"c{i}_{kind}"] = values
        tables[f"t{t}"] = columns
    return tables


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tables=table_sets(), summary=st.binary(max_size=64))
def test_round_trip_every_kind(tmp_path: Path, fmt: str, tables: dict[str, dict[str, np.ndarray]],
                               summary: bytes) -> None:
    number = len(list_periods(tmp_path))
    path = write_period(tmp_path, number, tables, summary, format=fmt)
    assert path == period_dir(tmp_path, number) == tmp_path / f"period-{number:06d}"
    got, got_summary = read_period(tmp_path, number)
    assert type(got_summary) is bytes and got_summary == summary
    assert_same(got, tables)
    verify_period(tmp_path, number)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [0, 1, 5, 300])
def test_round_trip_settlement_shape(tmp_path: Path, fmt: str, rows: int) -> None:
    tables = settlement_like(rows)
    write_period(tmp_path, 3, tables, b"\x93signed\0", format=fmt)
    got, summary = read_period(tmp_path, 3)
    assert summary == b"\x93signed\0"
    assert_same(got, tables)
    # One table, and the arrays are the caller's to change, as np.load's are.
    (only, _) = read_period(tmp_path, 3, tables=["findings"])
    assert list(only) == ["findings"]
    assert all(values.flags.writeable for values in only["findings"].values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_width_arrays_say_the_kind_of_an_empty_column(tmp_path: Path, fmt: str) -> None:
    tables = {"t": {"gw": np.array([], dtype="U1"), "tok": np.array([], dtype="S1"),
                    "obj": np.array([], dtype=object), "names": np.array(["ab", "ü"])[:0]}}
    write_period(tmp_path, 1, tables, b"", format=fmt)
    manifest = archive._open(period_dir(tmp_path, 1), 1)
    # An empty object column has no kind to see: it is stored as bytes.
    assert manifest.tables["t"].columns == [("gw", "str"), ("tok", "bytes"), ("obj", "bytes"),
                                            ("names", "str")]
    got, _ = read_period(tmp_path, 1)
    assert all(v.dtype == object and v.shape == (0,) for v in got["t"].values())
    write_period(tmp_path, 2, {"t": {"names": np.array(["ab", "ü"]),
                                     "raw": np.array([b"x", b"yz"])}}, b"", format=fmt)
    got, _ = read_period(tmp_path, 2)
    assert got["t"]["names"].tolist() == ["ab", "ü"] and got["t"]["raw"].tolist() == [b"x", b"yz"]
    # numpy's scalar subclasses in an object column are stored as plain bytes and str.
    write_period(tmp_path, 3, {"t": {"raw": objects([np.bytes_(b"a"), b"b\0"]),
                                     "names": objects([np.str_("é"), "x"])}}, b"", format=fmt)
    got, _ = read_period(tmp_path, 3)
    assert [type(v) for v in got["t"]["raw"]] == [bytes, bytes]
    assert [type(v) for v in got["t"]["names"]] == [str, str]
    assert got["t"]["raw"].tolist() == [b"a", b"b\0"] and got["t"]["names"].tolist() == ["é", "x"]


def test_big_endian_input_is_stored_little_endian(tmp_path: Path) -> None:
    values = np.arange(4, dtype=">u4")
    write_period(tmp_path, 1, {"t": {"v": values}}, b"", format="npy")
    got, _ = read_period(tmp_path, 1)
    assert got["t"]["v"].dtype == np.dtype("<u4") and got["t"]["v"].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------
# Arguments.

def test_formats_and_paths(tmp_path: Path) -> None:
    assert archive.FORMATS == ("parquet", "npy")
    assert "npy" in archive.available_formats()
    assert archive.default_format() == ("parquet" if HAVE_PARQUET else "npy")
    assert period_dir(str(tmp_path), 7) == tmp_path / "period-000007"
    assert period_dir(tmp_path, 1234567).name == "period-1234567"
    assert period_dir(tmp_path, np.int64(5)).name == "period-000005"  # type: ignore[arg-type]
    for bad in (-1, 1.0, True, "1", None, 2**63):
        with pytest.raises(InvalidArgument):
            period_dir(tmp_path, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            write_period(tmp_path, bad, {}, b"")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            read_period(tmp_path, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="format"):
        write_period(tmp_path, 1, {}, b"", format="csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tables, match", [
    ({"t": {"a": [1, 2]}}, "1-D numpy array"),
    ({"t": {"a": np.zeros((2, 2))}}, "1-D numpy array"),
    ({"t": {"a": np.zeros(2, np.float16)}}, "float16"),
    ({"t": {"a": np.zeros(2, "datetime64[s]")}}, "datetime64"),
    ({"t": {"a": objects([b"x", "y"])}}, "only bytes or only str"),
    ({"t": {"a": objects(["x", b"y"])}}, "only bytes or only str"),
    ({"t": {"a": objects([b"x", None])}}, "only bytes or only str"),
    ({"t": {"a": objects([1, 2])}}, "only bytes or only str"),
    ({"t": {"a": objects(["ok", "\ud800"])}}, "not valid unicode"),
    ({"t": {"a": np.zeros(2), "b": np.zeros(3)}}, "different lengths"),
    ({"t": {}}, "1 to 1024 columns"),
    ({"t": [np.zeros(2)]}, "1 to 1024 columns"),
    ({"bad.name": {"a": np.zeros(2)}}, "table name"),
    ({"../up": {"a": np.zeros(2)}}, "table name"),
    ({"t": {"a/b": np.zeros(2)}}, "column name"),
    ({"t": {"x.data": np.zeros(2)}}, "column name"),
    ({"t": {"1st": np.zeros(2)}}, "column name"),
    ({"t": {"": np.zeros(2)}}, "column name"),
    ([("t", {})], "mapping"),
])
def test_what_is_not_a_table_is_refused_before_anything_is_written(
        tmp_path: Path, tables: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        write_period(tmp_path, 1, tables, b"", format="npy")
    with pytest.raises(InvalidArgument, match="a summary is bytes"):
        write_period(tmp_path, 1, {}, "text", format="npy")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_root_that_cannot_be_made_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    for root in (tmp_path / "file", tmp_path / "file" / "below", f"{tmp_path}/nul\0byte", ""):
        with pytest.raises(ArchiveUnavailable):
            write_period(root, 1, {"t": {"a": np.zeros(1)}}, b"", format="npy")
    with pytest.raises(InvalidArgument):
        write_period(42, 1, {}, b"")  # type: ignore[arg-type]
    with pytest.raises(ArchiveUnavailable):
        list_periods(tmp_path / "file")
    # A new root, several folders deep, is made (and synced into its parents).
    deep = tmp_path / "a" / "b" / "archive"
    write_period(deep, 1, {"t": {"a": np.zeros(1)}}, b"", format="npy")
    assert list_periods(deep) == [1]


def test_reading_what_is_not_there(tmp_path: Path) -> None:
    assert list_periods(tmp_path / "nothing") == []
    with pytest.raises(ArchiveUnavailable, match="period 4 is not in the archive"):
        read_period(tmp_path, 4)
    with pytest.raises(ArchiveUnavailable, match="period 4 is not in the archive"):
        verify_period(tmp_path, 4)
    write_period(tmp_path, 4, settlement_like(3), b"s", format="npy")
    with pytest.raises(InvalidArgument, match="no table 'charges'"):
        read_period(tmp_path, 4, tables=["records", "charges"])
    with pytest.raises(InvalidArgument, match="not one name"):
        read_period(tmp_path, 4, tables="records")
    assert read_period(tmp_path, 4, tables=[])[0] == {}


# --------------------------------------------------------------------------
# Crashes.

def test_list_periods_lists_complete_periods_only(tmp_path: Path) -> None:
    for number in (12, 3, 1_000_000):
        write_period(tmp_path, number, {"t": {"a": np.arange(2)}}, b"", format="npy")
    (tmp_path / ".period-000005.tmp-0123abcd").mkdir()           # a crashed write
    (tmp_path / ".period-000005.tmp-0123abcd" / MANIFEST_NAME).write_bytes(b"x")
    (tmp_path / "period-000006").mkdir()                          # no manifest
    (tmp_path / "period-7").mkdir()                               # not a name we write
    (tmp_path / "period-0000008").mkdir()
    (tmp_path / "period-000009").write_bytes(b"a file")
    (tmp_path / "notes.txt").write_bytes(b"")
    for odd in ("period-7", "period-0000008"):
        (tmp_path / odd / MANIFEST_NAME).write_bytes(b"x")
    assert list_periods(tmp_path) == [3, 12, 1_000_000]
    assert list_periods(str(tmp_path)) == [3, 12, 1_000_000]



def temp_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".period-"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_leftovers_of_a_crash_are_ignored_then_removed(tmp_path: Path, fmt: str) -> None:
    tables = settlement_like(20)
    write_period(tmp_path, 1, tables, b"one", format=fmt)
    # What a crash leaves: a temporary folder with some of the files, one of
    # them cut short, and no manifest (or one not yet renamed into place).
    for name in (".period-000002.tmp-aa11", ".period-000002.tmp-bb22", ".period-000009.tmp-cc"):
        (tmp_path / name).mkdir()
    for source in period_dir(tmp_path, 1).iterdir():
        data = source.read_bytes()
        (tmp_path / ".period-000002.tmp-aa11" / source.name).write_bytes(data[: len(data) // 2])
        (tmp_path / ".period-000002.tmp-bb22" / source.name).write_bytes(data)
    assert list_periods(tmp_path) == [1]
    with pytest.raises(ArchiveUnavailable, match="not in the archive"):
        read_period(tmp_path, 2)
    # A write in progress elsewhere holds its folder locked: the sweep keeps it.
    busy = tmp_path / ".period-000003.tmp-dd44"
    busy.mkdir()
    held = archive._lock(busy, wait=False)
    assert held is not None
    try:
        write_period(tmp_path, 2, tables, b"two", format=fmt)
        kept = [busy.name] if fcntl is not None else []
        assert temp_folders(tmp_path) == kept
    finally:
        os.close(held)
    assert list_periods(tmp_path) == [1, 2]
    assert_same(read_period(tmp_path, 2)[0], tables)
    write_period(tmp_path, 4, tables, b"four", format=fmt)
    assert temp_folders(tmp_path) == []


def fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every fd os.fsync is called with (Linux /proc)."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_the_folder_and_the_root_are_synced_in_order(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    seen = fsynced_paths(monkeypatch)
    final = write_period(root, 1, settlement_like(10), b"s", format=fmt)
    temp = Path(seen[0]).parent
    assert temp.parent == root and temp.name.startswith(".period-000001.tmp-")
    files = sorted(p.name for p in final.iterdir())
    assert sorted(Path(p).name for p in seen[:-3]) == sorted(set(files) - {MANIFEST_NAME})
    # The manifest after every other file, then the folder, then (renamed) the root.
    assert seen[-3:] == [str(temp / MANIFEST_NAME), str(temp), str(root.resolve())]


# A child process that writes period 2 and dies (os._exit) at its K-th fsync,
# before that fsync runs: as a kill -9 or a crash would leave it.
CRASH_CHILD = """
import os, sys
sys.path.insert(0, {src!r})
import numpy as np
from qrpay.archive import write_period
root, fmt, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0
real = os.fsync
def fsync(fd):
    global calls
    calls += 1
    if calls == k:
        os._exit(17)
    real(fd)
os.fsync = fsync
{tables}
write_period(root, 2, TABLES, b"summary two", format=fmt)
"""
CRASH_TABLES = """
def _objects(items):
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
_rng = np.random.default_rng(11)
TABLES = {
    "records": {"serial": np.arange(50, dtype=np.uint64),
                "token": _objects([_rng.bytes(int(n)) + b"\\0" for n in _rng.integers(0, 90, 50)]),
                "gateway": _objects(["gw-%d-é" % (i % 3) for i in range(50)])},
    "totals": {"account": np.arange(5, dtype=np.uint64), "amount": np.arange(5, dtype=np.int64)},
}
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_kill_at_any_fsync_leaves_all_or_nothing(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names: dict[str, Any] = {"np": np}
    exec(CRASH_TABLES, names)   # noqa: S102 - the very code the children run
    tables = names["TABLES"]
    # How many fsyncs one write of period 2 makes, on a root that exists.
    counted = tmp_path / "counted"
    write_period(counted, 1, tables, b"summary one", format=fmt)
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_period(counted, 2, tables, b"summary two", format=fmt)
    monkeypatch.undo()
    total = len(calls)
    assert total >= 5
    # One child per fsync (and one past the last, that must finish), all at once.
    child = CRASH_CHILD.format(src=SRC, tables=CRASH_TABLES)
    roots, runs = [], []
    for k in range(1, total + 2):
        root = tmp_path / f"k{k}"
        write_period(root, 1, tables, b"summary one", format=fmt)
        roots.append(root)
        runs.append(subprocess.Popen([sys.executable, "-c", child, str(root), fmt, str(k)],
                                     stderr=subprocess.PIPE))
    for k, (root, run) in enumerate(zip(roots, runs), start=1):
        _, err = run.communicate(timeout=60)
        assert run.returncode == (17 if k <= total else 0), (k, err.decode())
        # Only the last fsync (of the root, after the rename) comes after the
        # period is in place; a crash anywhere before it leaves no period 2.
        complete = k >= total
        assert list_periods(root) == ([1, 2] if complete else [1]), k
        assert bool(temp_folders(root)) == (k < total), k
        verify_period(root, 1)
        assert read_period(root, 1)[1] == b"summary one"
        if not complete:
            with pytest.raises(ArchiveUnavailable):
                read_period(root, 2)
        # The caller retries: the write completes (or finds its own period),
        # and the leftovers are gone.
        assert write_period(root, 2, tables, b"summary two", format=fmt) == period_dir(root, 2)
        assert temp_folders(root) == []
        got, summary = read_period(root, 2)
        assert summary == b"summary two"
        assert_same(got, tables)


# --------------------------------------------------------------------------
# Tampering.

def written(root: Path, fmt: str) -> Path:
    write_period(root, 1, settlement_like(0), b"empty", format=fmt)
    return write_period(root, 2, settlement_like(40), b"summary", format=fmt)


def assert_unavailable(root: Path, name: str) -> None:
    for check in (lambda: read_period(root, 2), lambda: verify_period(root, 2)):
        with pytest.raises(ArchiveUnavailable, match=name.replace(".", r"\.")):
            check()
    # Other periods are not affected.
    verify_period(root, 1)


def file_names(fmt: str) -> list[str]:
    if fmt == "parquet":
        return ["records.parquet", "findings.parquet", "summary.msgpack", MANIFEST_NAME]
    return ["records.record.npy", "records.token.data.npy", "records.token.offsets.npy",
            "records.gateway.data.npy", "findings.flag.npy", "findings.share.npy",
            "summary.msgpack", MANIFEST_NAME]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_in_any_file_is_found_and_named(tmp_path: Path, fmt: str) -> None:
    final = written(tmp_path, fmt)
    assert set(file_names(fmt)) <= {p.name for p in final.iterdir()}
    for name in sorted(p.name for p in final.iterdir()):
        path = final / name
        original = path.read_bytes()
        for at in (0, len(original) // 2, len(original) - 1):
            data = bytearray(original)
            data[at] ^= 0x01
            path.write_bytes(bytes(data))
            assert_unavailable(tmp_path, name)
        path.write_bytes(original)
        verify_period(tmp_path, 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cut_short_or_missing_file_is_found_and_named(tmp_path: Path, fmt: str) -> None:
    final = written(tmp_path, fmt)
    for name in sorted(p.name for p in final.iterdir()):
        path = final / name
        original = path.read_bytes()
        path.write_bytes(original[:-1])
        assert_unavailable(tmp_path, name)
        path.write_bytes(original + b"\0")
        assert_unavailable(tmp_path, name)
        if name != MANIFEST_NAME:
            path.unlink()
            assert_unavailable(tmp_path, f"{name}: missing")
        path.write_bytes(original)
    verify_period(tmp_path, 2)
    (final / MANIFEST_NAME).unlink()
    assert list_periods(tmp_path) == [1]
    assert_unavailable(tmp_path, MANIFEST_NAME)
    # Not a period: a write does not take the folder over, nor treat it as ours.
    with pytest.raises(ArchiveUnavailable, match=f"without a {MANIFEST_NAME}"):
        write_period(tmp_path, 2, settlement_like(40), b"summary", format=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unknown_file_or_a_foreign_manifest_is_found(tmp_path: Path, fmt: str) -> None:
    final = written(tmp_path, fmt)
    (final / "extra.parquet").write_bytes(b"")
    assert_unavailable(tmp_path, "extra.parquet: a file the manifest does not name")
    (final / "extra.parquet").unlink()
    # The manifest of period 1 in period 2's folder: another period, other files.
    original = (final / MANIFEST_NAME).read_bytes()
    (final / MANIFEST_NAME).write_bytes((period_dir(tmp_path, 1) / MANIFEST_NAME).read_bytes())
    assert_unavailable(tmp_path, "the manifest of period 1, not 2")
    (final / MANIFEST_NAME).write_bytes(original)
    verify_period(tmp_path, 2)


def test_a_manifest_of_another_format_or_version_is_refused(tmp_path: Path) -> None:
    final = written(tmp_path, "npy")
    manifest = final / MANIFEST_NAME
    outer = unpack_strict(manifest.read_bytes(), max_str=0)
    doc = unpack_strict(outer[0])
    for change in ({"version": 2}, {"format": "feather"}, {"period": 3}):
        body = pack({**doc, **change})
        manifest.write_bytes(pack([body, archive._digest_of(body)]))
        assert_unavailable(tmp_path, MANIFEST_NAME)
    manifest.write_bytes(pack([outer[0], outer[1]]))
    verify_period(tmp_path, 2)


# --------------------------------------------------------------------------
# Immutability.

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_closed_period_is_never_overwritten(tmp_path: Path, fmt: str) -> None:
    tables = settlement_like(30)
    final = write_period(tmp_path, 5, tables, b"summary", format=fmt)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.iterdir()}
    # A retry of the very same content (in either format) returns the folder.
    for retry_format in archive.available_formats():
        assert write_period(tmp_path, 5, settlement_like(30), b"summary",
                            format=retry_format) == final
    changed = settlement_like(30)
    changed["records"]["amount"] = changed["records"]["amount"].copy()
    changed["records"]["amount"][7] += 1
    retyped = settlement_like(30)
    retyped["findings"]["delta"] = retyped["findings"]["delta"].astype(np.float64)
    reordered = settlement_like(30)
    reordered["findings"] = dict(reversed(reordered["findings"].items()))
    token_kind = settlement_like(30)
    token_kind["records"]["gateway"] = objects([s.encode() for s in tables["records"]["gateway"]])
    signed_zero = settlement_like(30)
    signed_zero["findings"]["share"] = signed_zero["findings"]["share"].copy()
    signed_zero["findings"]["share"][1] = 0.0    # was -0.0
    for other, summary in ((tables, b"summary!"), (changed, b"summary"), (retyped, b"summary"),
                           (reordered, b"summary"), (token_kind, b"summary"),
                           (signed_zero, b"summary"), ({"records": tables["records"]}, b"summary"),
                           ({**tables, "more": {"a": np.zeros(1)}}, b"summary")):
        with pytest.raises(PeriodClosed, match="period 5 is archived already"):
            write_period(tmp_path, 5, other, summary, format=fmt)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in final.iterdir()} == before
    assert temp_folders(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_period_written_a_table_at_a_time(tmp_path: Path, fmt: str) -> None:
    """PeriodWriter: tables added from other threads at once, then one
    commit, read back as write_period's; given up, it leaves nothing; used
    after its commit, a typed error."""
    from concurrent.futures import ThreadPoolExecutor

    tables = settlement_like(40)
    with archive.PeriodWriter(tmp_path, 3, format=fmt) as writer:
        with ThreadPoolExecutor(len(tables)) as pool:
            list(pool.map(writer.add, *zip(*tables.items())))
        assert list_periods(tmp_path) == []   # nothing in place before the commit
        with pytest.raises(InvalidArgument, match="added already"):
            writer.add("records", tables["records"])
        final = writer.commit(b"summary")
        with pytest.raises(InvalidArgument, match="committed"):
            writer.add("more", {"a": np.zeros(1)})
        with pytest.raises(InvalidArgument, match="committed"):
            writer.commit(b"summary")
    got, summary = read_period(tmp_path, 3)
    assert summary == b"summary" and final == period_dir(tmp_path, 3)
    assert_same({name: got[name] for name in tables}, tables)

    with archive.PeriodWriter(tmp_path, 4, format=fmt) as writer:
        writer.add("records", tables["records"])
    assert list_periods(tmp_path) == [3] and temp_folders(tmp_path) == []
    # An archived period: the same content is its folder, other content PeriodClosed.
    with archive.PeriodWriter(tmp_path, 3, format=fmt) as writer:
        for name, table in tables.items():
            writer.add(name, table)
        assert writer.commit(b"summary") == final
    with archive.PeriodWriter(tmp_path, 3, format=fmt) as writer:
        writer.add("records", tables["records"])
        with pytest.raises(PeriodClosed):
            writer.commit(b"summary")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_writer_that_loses_the_race_compares(tmp_path: Path, fmt: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process renames its period into place just before this one does.
    tables = settlement_like(10)
    root, other = tmp_path / "archive", tmp_path / "other"
    write_period(other, 5, tables, b"same", format="npy")
    write_period(other, 6, tables, b"different", format="npy")
    real = os.rename

    def rename(source: Any, target: Any) -> None:
        real(other / Path(target).name, target)
        real(source, target)   # fails: the folder is there, complete

    monkeypatch.setattr(os, "rename", rename)
    assert write_period(root, 5, tables, b"same", format=fmt) == period_dir(root, 5)
    with pytest.raises(PeriodClosed):
        write_period(root, 6, tables, b"mine", format=fmt)
    monkeypatch.undo()
    assert temp_folders(root) == []
    assert read_period(root, 5)[1] == b"same" and read_period(root, 6)[1] == b"different"


# --------------------------------------------------------------------------
# The files without qrpay.

def test_npy_files_are_numpy_files(tmp_path: Path) -> None:
    tables = settlement_like(25)
    final = write_period(tmp_path, 1, tables, b"", format="npy")
    record = np.load(final / "records.record.npy", allow_pickle=False)
    assert record.dtype == np.uint64 and record.tolist() == tables["records"]["record"].tolist()
    data = np.load(final / "records.gateway.data.npy", allow_pickle=False)
    offsets = np.load(final / "records.gateway.offsets.npy", allow_pickle=False)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64
    raw = data.tobytes()
    assert [raw[a:b].decode() for a, b in itertools.pairwise(offsets.tolist())] == \
        tables["records"]["gateway"].tolist()


@pytest.mark.skipif(not HAVE_PARQUET, reason="pyarrow is not installed")
def test_parquet_files_are_plain(tmp_path: Path) -> None:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    tables = settlement_like(25)
    final = write_period(tmp_path, 1, tables, b"", format="parquet")
    meta = pq.ParquetFile(final / "records.parquet")
    assert b"pandas" not in (meta.schema_arrow.metadata or {})
    assert meta.metadata.row_group(0).column(0).compression == \
        archive.PARQUET_COMPRESSION.upper()
    read = pq.read_table(final / "records.parquet")
    assert read.schema.types == [pa.uint64(), pa.uint32(), pa.uint8(), pa.string(), pa.binary()]
    assert read.column("token").to_pylist() == tables["records"]["token"].tolist()
    # In the Parquet schema itself (what DuckDB and Spark read): unsigned,
    # STRING and plain BINARY.
    parquet = [meta.schema.column(i) for i in range(5)]
    assert json.loads(parquet[0].logical_type.to_json()) == \
        {"Type": "Int", "bitWidth": 64, "isSigned": False}
    assert [c.physical_type for c in parquet[3:]] == ["BYTE_ARRAY", "BYTE_ARRAY"]
    assert [c.logical_type.type for c in parquet[3:]] == ["STRING", "NONE"]


@pytest.mark.skipif(not HAVE_PARQUET, reason="pyarrow is not installed")
def test_pandas_reads_the_parquet_files(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    tables = settlement_like(25)
    final = write_period(tmp_path, 1, tables, b"", format="parquet")
    for name, columns in tables.items():
        frame = pd.read_parquet(final / f"{name}.parquet")
        assert list(frame.columns) == list(columns)
        for column, values in columns.items():
            got = frame[column].to_numpy()
            if values.dtype == object:
                assert got.tolist() == values.tolist(), column
            else:
                assert got.dtype == values.dtype and got.tobytes() == values.tobytes(), column


@pytest.mark.parametrize("fmt", FORMATS)
def test_labels_are_a_str_column_given_as_codes(tmp_path: Path, fmt: str) -> None:
    """archive.Labels: codes into names, stored and read back as str (a close
    writes each record's gateway so); pandas reads strings, not categories;
    a code that names nothing, or names that are not str, are refused."""
    names = ("gw-b", "gw-a", "é-ferry")
    codes = np.array([2, 0, 0, 1, 2, 2], dtype=np.int64)
    want = objects([names[c] for c in codes])
    labels = archive.Labels(codes, names)
    assert labels.materialized().tolist() == want.tolist()
    final = write_period(tmp_path, 1, {"records": {"gateway": labels,
                                                   "n": np.arange(6, dtype=np.uint32)}},
                         b"s", format=fmt)
    tables, _ = read_period(tmp_path, 1)
    assert_same(tables, {"records": {"gateway": want, "n": np.arange(6, dtype=np.uint32)}})
    # Written again with the same rows as plain str: the same period.
    write_period(tmp_path, 1, {"records": {"gateway": want, "n": np.arange(6, dtype=np.uint32)}},
                 b"s", format=fmt)
    if fmt == "parquet":
        pd = pytest.importorskip("pandas")
        frame = pd.read_parquet(final / "records.parquet")
        assert not isinstance(frame["gateway"].dtype, pd.CategoricalDtype)
        assert frame["gateway"].tolist() == want.tolist()
    for bad in (archive.Labels(np.array([0, 3]), names), archive.Labels(np.array([-1]), names),
                archive.Labels(np.array([0.0]), names), archive.Labels(np.array([0]), (b"x",)),
                archive.Labels([0], names), archive.Labels(np.array([0]), ("\ud800",))):
        with pytest.raises(InvalidArgument):
            write_period(tmp_path / "bad", 1, {"t": {"g": bad}}, b"", format=fmt)
    assert not (tmp_path / "bad" / "period-000001").exists()


# With this finder first on sys.meta_path, `import pyarrow` fails as it does
# where it is not installed.
NO_PYARROW = """
import sys
class NoPyarrow:
    def find_spec(self, name, path=None, target=None):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ModuleNotFoundError("No module named 'pyarrow'", name=name)
        return None
sys.meta_path.insert(0, NoPyarrow())
"""

WITHOUT_PYARROW = NO_PYARROW + """
sys.path.insert(0, {src!r})
import numpy as np
import qrpay.archive as archive
from qrpay.errors import ArchiveUnavailable, InvalidArgument
root = sys.argv[1]
assert archive.available_formats() == ("npy",), archive.available_formats()
assert archive.default_format() == "npy"
token = np.empty(2, dtype=object)
token[:] = [b"a\\0", b""]
gateway = np.empty(2, dtype=object)
gateway[:] = ["gw-é", "x"]
tables = {{"t": {{"token": token, "gateway": gateway, "n": np.array([1, 2**64 - 1], np.uint64)}}}}
archive.write_period(root, 1, tables, b"s\\0")
got, summary = archive.read_period(root, 1)
assert summary == b"s\\0" and got["t"]["token"].tolist() == [b"a\\0", b""]
assert got["t"]["gateway"].tolist() == ["gw-é", "x"] and got["t"]["n"].dtype == np.uint64
try:
    archive.write_period(root, 2, tables, b"", format="parquet")
    raise SystemExit("parquet written without pyarrow")
except InvalidArgument as exc:
    assert "pip install 'qrpay[archive]'" in str(exc), exc
archive.verify_period(root, 3)          # written as parquet by the test: hashes only
try:
    archive.read_period(root, 3)
    raise SystemExit("parquet read without pyarrow")
except ArchiveUnavailable as exc:
    assert "pip install 'qrpay[archive]'" in str(exc), exc
assert archive.list_periods(root) == [1, 3]
print("ok", sorted(m for m in sys.modules if m.startswith("pyarrow")))
"""


def test_import_and_npy_without_pyarrow(tmp_path: Path) -> None:
    if HAVE_PARQUET:
        write_period(tmp_path, 3, settlement_like(4), b"p", format="parquet")
    else:
        write_period(tmp_path, 3, settlement_like(4), b"p", format="npy")
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYARROW.format(src=SRC), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok", "[]"]
    # Where pyarrow is installed, importing the archive does not import it.
    lazy = ("import sys, qrpay.archive; "
            "print(sorted(m for m in sys.modules if m.startswith('pyarrow')))")
    run = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"



@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_a_2d_uint8_array_is_a_fixed_width_bytes_column(tmp_path: Path, fmt: str,
                                                       rows: int) -> None:
    """Tokens as one 204-byte row each: stored whole (trailing NULs too),
    read back as the same 2-D array; in Parquet a fixed-size, uncompressed
    BINARY column every reader takes."""
    tokens = np.random.default_rng(rows).integers(0, 256, (rows, 204), dtype=np.uint8)
    if rows:
        tokens[0, -5:] = 0
    archive.write_period(tmp_path, 1, {"r": {"n": np.arange(rows), "token": tokens}}, b"",
                         format=fmt)
    got = archive.read_period(tmp_path, 1)[0]["r"]["token"]
    assert got.dtype == np.uint8 and got.shape == (rows, 204) and np.array_equal(got, tokens)
    got[...] = 1   # writable, as np.load's arrays are
    archive.verify_period(tmp_path, 1)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        meta = pq.ParquetFile(tmp_path / "period-000001" / "r.parquet")
        assert str(meta.schema_arrow.field("token").type) == "fixed_size_binary[204]"
        if rows:
            assert meta.metadata.row_group(0).column(1).compression == "UNCOMPRESSED"
            assert pq.read_table(tmp_path / "period-000001" / "r.parquet")[
                "token"][0].as_py() == tokens[0].tobytes()
    with pytest.raises(InvalidArgument):
        archive.write_period(tmp_path, 2, {"r": {"token": tokens.astype(np.int16)}}, b"",
                             format=fmt)


def test_parquet_uses_dictionary_pages_only_for_columns_of_few_values(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")   # in the test extra: never skipped in CI
    rng = np.random.default_rng(5)
    rows = 200_000
    folder = archive.write_period(tmp_path, 1, {"t": {
        "scene": rng.integers(0, 6, rows).astype(np.uint8),
        "serial": rng.integers(0, 2**63, rows).astype(np.uint64),
        "sorted_account": np.sort(rng.integers(0, 150_000, rows)).astype(np.uint64),
        "name": np.array([f"gw-{i % 7}" for i in range(rows)], dtype=object),
    }}, b"", format="parquet")
    meta = pq.ParquetFile(folder / "t.parquet").metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings
                 for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["scene"] and "RLE_DICTIONARY" in encodings["name"]
    # Many distinct values, also when the first rows repeat a few (a sorted column).
    assert "RLE_DICTIONARY" not in encodings["serial"]
    assert "RLE_DICTIONARY" not in encodings["sorted_account"]
    got = archive.read_period(tmp_path, 1)[0]["t"]
    assert got["sorted_account"][-1] == np.sort(got["sorted_account"])[-1] and len(got["name"]) == rows
