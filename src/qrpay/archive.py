"""The archive of closed periods: one folder per period, written once, read back
only after every file is checked against the period's manifest.

    root/period-000007/
        manifest.msgpack      written last: format, tables, columns, and per file
                              its size and BLAKE2b-256 digest
        summary.msgpack       the caller's summary bytes, as given
        <table>.parquet       format "parquet" (pyarrow), one file per table
        <table>.<column>.npy  format "npy" (numpy alone); a bytes or str column
                              is <table>.<column>.data.npy (uint8, utf-8 for str)
                              and <table>.<column>.offsets.npy (int64, rows + 1)

A period is written into a temporary sibling folder, every file fsynced, the
manifest last, then renamed into place: a crash leaves either the whole period
or a `.period-NNNNNN.tmp-*` folder that readers ignore and the next
write_period removes. A complete period is never overwritten. The module knows
nothing about settlement: it stores named tables of numpy columns.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np
import numpy.lib.format as npy_format
import numpy.typing as npt

from qrpay.anchor import sync_directory
from qrpay.errors import ArchiveUnavailable, InvalidArgument, MalformedMessage, PeriodClosed
from qrpay.wire import pack, unpack_strict

__all__ = [
    "FORMATS", "Labels", "PeriodWriter", "Table", "WrittenTable", "available_formats",
    "default_format", "list_periods", "period_dir", "read_period", "read_written",
    "table_names", "verify_period", "write_period", "write_table",
]


class Labels(NamedTuple):
    """A str column given as `codes` into `names` (row i is
    names[codes[i]]): how a column of few distinct values, such as the
    gateway of each record, is held in memory. Stored and read back as a str
    column; Parquet writes it dictionary-encoded straight from the codes,
    without making a Python object per row."""

    codes: npt.NDArray[np.integer[Any]]
    names: tuple[str, ...]

    def materialized(self) -> npt.NDArray[np.object_]:
        """The column as an object array of str."""
        names = np.empty(len(self.names), dtype=object)
        names[:] = self.names
        out: npt.NDArray[np.object_] = names[self.codes]
        return out


Table = dict[str, Any]   # column name -> numpy array (or Labels, when writing)

FORMATS: tuple[str, ...] = ("parquet", "npy")
FORMAT_VERSION = 1
MANIFEST = "manifest.msgpack"
SUMMARY = "summary.msgpack"
# zstd level 1 rather than snappy: on a million settlement rows it writes in
# ~0.5 s more and reads as fast, and the numeric columns take 16% less space
# (the random 225-byte tokens, 90% of the bytes, compress under neither). A
# period is written once and scanned often. benchmarks/test_bench_archive.py.
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 1

_NUMERIC = {np.dtype(name).name: np.dtype(name) for name in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64")}
_KINDS = frozenset(_NUMERIC) | {"bytes", "str"}
# A column of equal-width bytes (tokens, keys) given as a 2-D uint8 array:
# kind "fixed:WIDTH"; Parquet FIXED_LEN_BYTE_ARRAY, a 2-D .npy. Random bytes
# as a rule, so stored without compression, and never as Python objects.
_FIXED = re.compile(r"fixed:([1-9][0-9]{0,4})")
_MAX_WIDTH = 65_535


def _width(kind: str) -> int | None:
    """The width of a fixed-width kind, or None for any other kind."""
    match = _FIXED.fullmatch(kind)
    return int(match.group(1)) if match and int(match.group(1)) <= _MAX_WIDTH else None


def _known(kind: object) -> bool:
    return isinstance(kind, str) and (kind in _KINDS or _width(kind) is not None)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PERIOD = re.compile(r"period-([0-9]{6,})")
_TEMP = re.compile(r"\.period-[0-9]{6,}\.tmp-[0-9a-f]+")
_MAX_NAMES = 1024          # tables per period, columns per table
_MAX_NUMBER = 2**63 - 1
_CHUNK = 1 << 20
_NPY_HEAD = 16384    # np.load reads headers of up to 10,000 bytes by default
_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
_OFFSETS = np.dtype("<i8")
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class _Column(NamedTuple):
    name: str
    kind: str                    # a _NUMERIC name, "bytes", "str" or "fixed:WIDTH"
    values: npt.NDArray[Any] | Labels   # little-endian numbers, an object array, 2-D
                                        # uint8, or (a str column) Labels

    @property
    def rows(self) -> int:
        return len(self.values.codes if isinstance(self.values, Labels) else self.values)

    def array(self) -> npt.NDArray[Any]:
        """The values as a numpy array (Labels made an object array)."""
        values = self.values
        return values.materialized() if isinstance(values, Labels) else values


class _File(NamedTuple):
    size: int
    digest: bytes


class _Table(NamedTuple):
    rows: int
    columns: list[tuple[str, str]]   # (name, kind), in order
    files: dict[str, _File]


class _Manifest(NamedTuple):
    format: str
    tables: dict[str, _Table]
    summary: _File


class WrittenTable(NamedTuple):
    """A table written ahead of its period, into a folder of its own
    (write_table): what a period's manifest says of it. PeriodWriter.adopt
    links its files into the period rather than writing them again."""

    format: str
    name: str
    rows: int
    columns: list[tuple[str, str]]   # (name, kind), in order
    files: dict[str, tuple[int, bytes]]   # file name -> (size, BLAKE2b-256)

    def _entry(self) -> _Table:
        """What the manifest holds of it."""
        return _Table(self.rows, self.columns, {f: _File(*e) for f, e in self.files.items()})

    def to_bytes(self) -> bytes:
        return pack([self.format, self.name, self.rows, [list(c) for c in self.columns],
                     {f: list(entry) for f, entry in self.files.items()}])

    @classmethod
    def from_bytes(cls, data: bytes) -> WrittenTable:
        """The table `to_bytes` gave; ArchiveUnavailable if it is not one."""
        try:
            fmt, name, rows, columns, files = unpack_strict(
                data, max_map=_MAX_NAMES, max_array=_MAX_NAMES)
            checked = [(_check_name("a column", c[0]), c[1]) for c in columns
                       if len(c) == 2 and _known(c[1])]
            entries = {f: tuple(_file(entry)) for f, entry in files.items()}
            if (fmt not in FORMATS or len(checked) != len(columns) or not checked
                    or sorted(entries) != sorted(_files(fmt, _check_name("a table", name),
                                                        checked))):
                raise ValueError("not the files of its columns")
            return cls(fmt, name, _want(rows, int), checked, entries)  # type: ignore[arg-type]
        except (MalformedMessage, InvalidArgument, ValueError, TypeError) as exc:
            raise ArchiveUnavailable(f"not a written table this qrpay reads ({exc})") from None


# --------------------------------------------------------------------------
# Formats and paths.

@functools.lru_cache(maxsize=1)
def _pyarrow() -> tuple[Any, Any] | None:
    """(pyarrow, pyarrow.parquet), or None. Imported here, on first use: the
    core install has no pyarrow, and where it is installed its import costs
    50 to 90 ms that a caller of the npy format need not pay."""
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        return None
    return pyarrow, pyarrow.parquet


def available_formats() -> tuple[str, ...]:
    """The formats this install can write: "npy" always, "parquet" with pyarrow."""
    return FORMATS if _pyarrow() is not None else ("npy",)


def default_format() -> str:
    return "parquet" if _pyarrow() is not None else "npy"


def _arrow(why: str, error: type[InvalidArgument | ArchiveUnavailable]) -> tuple[Any, Any]:
    modules = _pyarrow()
    if modules is None:
        raise error(f"{why} needs pyarrow: pip install 'qrpay[archive]'")
    return modules


def _number(number: object) -> int:
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
        raise InvalidArgument(f"a period number is an int, not {type(number).__name__}")
    if not 0 <= number <= _MAX_NUMBER:
        raise InvalidArgument(f"a period number is 0 to 2**63 - 1, not {number}")
    return int(number)


def _root(root: str | os.PathLike[str]) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise InvalidArgument(f"an archive root is a path, not {type(root).__name__}")
    if not os.fspath(root):
        raise ArchiveUnavailable("an archive root is a path, not an empty string")
    return Path(root)


def period_dir(root: str | os.PathLike[str], number: int) -> Path:
    """The folder of period `number` under `root`: root / "period-000007"."""
    return _root(root) / f"period-{_number(number):06d}"


def _files(fmt: str, table: str, columns: Iterable[tuple[str, str]]) -> list[str]:
    """The file names a table has in a format: derived, never taken from a manifest."""
    if fmt == "parquet":
        return [f"{table}.parquet"]
    names = []
    for name, kind in columns:
        if kind in _NUMERIC or _width(kind) is not None:
            names.append(f"{table}.{name}.npy")
        else:
            names += [f"{table}.{name}.data.npy", f"{table}.{name}.offsets.npy"]
    return names


# --------------------------------------------------------------------------
# Checking what the caller gives.

def _objects(values: list[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(values), dtype=object)
    out[:] = values   # element by element: np.array(values) could make 2-D or 'S' arrays
    return out


def _labels(where: str, labels: Labels) -> Labels:
    codes, names = labels
    if (not isinstance(codes, np.ndarray) or codes.ndim != 1 or codes.dtype.kind not in "iu"
            or not isinstance(names, (tuple, list))
            or not all(isinstance(n, str) for n in names) or len(names) > 2**31 - 1):
        raise InvalidArgument(f"{where}: Labels are a 1-D integer array of codes and a "
                              "tuple of str names")
    if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
        raise InvalidArgument(f"{where}: a code that names no label")
    try:
        "".join(names).encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where}: a str that is not valid unicode ({exc.reason})") from None
    return Labels(np.ascontiguousarray(codes, dtype=np.int32), tuple(names))


def _column(table: str, name: str, values: object) -> _Column:
    where = f"{table}.{name}"
    if isinstance(values, Labels):
        return _Column(name, "str", _labels(where, values))
    if (isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype == np.uint8
            and 0 < values.shape[1] <= _MAX_WIDTH):
        return _Column(name, f"fixed:{values.shape[1]}", np.ascontiguousarray(values))
    if not isinstance(values, np.ndarray) or values.ndim != 1:
        raise InvalidArgument(f"{where}: a column is a 1-D numpy array (or a 2-D uint8 "
                              "array: one fixed-width bytes value per row)")
    dtype = values.dtype
    if dtype.name in _NUMERIC and dtype.kind in "biuf":
        return _Column(name, dtype.name, np.ascontiguousarray(values, dtype.newbyteorder("<")))
    if dtype.kind in "SU":
        # Fixed-width arrays say their kind even with no rows; numpy itself
        # drops trailing NULs from their items, so tokens belong in object arrays.
        return _Column(name, "bytes" if dtype.kind == "S" else "str", _objects(values.tolist()))
    if dtype.kind != "O":
        raise InvalidArgument(f"{where}: dtype {dtype} is not one the archive stores "
                              f"({', '.join(sorted(_NUMERIC))}, or object arrays of bytes or str)")
    items = values.tolist()
    types = set(map(type, items))
    # An object column with no rows carries no kind: it is stored as bytes.
    kind = "str" if types and all(issubclass(t, str) for t in types) else "bytes"
    if not all(issubclass(t, str if kind == "str" else bytes) for t in types):
        raise InvalidArgument(f"{where}: an object column holds only bytes or only str")
    if kind == "str":
        try:
            "".join(items).encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{where}: a str that is not valid unicode ({exc.reason})") from None
    if types - {bytes, str}:   # numpy.bytes_, numpy.str_ and the like: plain ones
        return _Column(name, kind, _objects(list(map(str if kind == "str" else bytes, items))))
    return _Column(name, kind, values)


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"{what} name {name!r} is not 1 to 64 of A-Z a-z 0-9 _, "
                              "not starting with a digit")
    return name


def _tables(tables: object) -> dict[str, list[_Column]]:
    if not isinstance(tables, Mapping):
        raise InvalidArgument("tables is a mapping of table name to {column name: array}")
    if len(tables) > _MAX_NAMES:
        raise InvalidArgument(f"at most {_MAX_NAMES} tables in a period")
    out: dict[str, list[_Column]] = {}
    for table, columns in tables.items():
        _check_name("a table", table)
        if not isinstance(columns, Mapping) or not 0 < len(columns) <= _MAX_NAMES:
            raise InvalidArgument(f"table {table}: 1 to {_MAX_NAMES} columns, as a mapping "
                                  "of column name to array")
        out[table] = [_column(table, _check_name("a column", name), values)
                      for name, values in columns.items()]
        lengths = {c.rows for c in out[table]}
        if len(lengths) != 1:
            raise InvalidArgument(f"table {table}: columns of different lengths {sorted(lengths)}")
    return out


# --------------------------------------------------------------------------
# Writing.

def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=32)


class _Sink:
    """A new file in the temporary folder: what is written is hashed on the
    way, and finish() fsyncs it before its size and digest go in the manifest."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "xb")   # noqa: SIM115 - closed by finish() or close()
        self._hash = _digest()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._file.write(view)
        self.size += view.nbytes
        return view.nbytes

    @property
    def closed(self) -> bool:   # with tell and flush: a file-like pyarrow writes to
        return self._file.closed

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> _File:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return _File(self.size, self._hash.digest())

    def close(self) -> None:
        self._file.close()


def _written(directory: Path, name: str, fill: Callable[[_Sink], object]) -> _File:
    """A new file, filled by `fill` and fsynced: its size and digest."""
    sink = _Sink(directory / name)
    try:
        fill(sink)
        return sink.finish()
    finally:
        sink.close()


def _write_file(directory: Path, name: str, *chunks: Any) -> _File:
    def fill(sink: _Sink) -> None:
        for chunk in chunks:
            sink.write(chunk)
    return _written(directory, name, fill)


def _save_npy(directory: Path, name: str, array: npt.NDArray[Any]) -> _File:
    # np.save takes any object with .write()
    return _written(directory, name, lambda sink: np.save(sink, array, allow_pickle=False))


def _encoded(column: _Column) -> list[bytes]:
    items: list[Any] = column.array().tolist()
    return [s.encode() for s in items] if column.kind == "str" else items


def _write_npy(directory: Path, table: str, columns: list[_Column]) -> dict[str, _File]:
    names = iter(_files("npy", table, ((c.name, c.kind) for c in columns)))
    files = {}
    for column in columns:
        if column.kind in _NUMERIC or _width(column.kind) is not None:
            name = next(names)
            files[name] = _save_npy(directory, name, column.array())
            continue
        items = _encoded(column)
        offsets = np.zeros(len(items) + 1, dtype=_OFFSETS)
        np.cumsum(np.fromiter(map(len, items), dtype=_OFFSETS, count=len(items)),
                  out=offsets[1:])
        data, offs = next(names), next(names)
        files[data] = _save_npy(directory, data, np.frombuffer(b"".join(items), dtype=np.uint8))
        files[offs] = _save_npy(directory, offs, offsets)
    return files


def _write_parquet(directory: Path, table: str, columns: list[_Column]) -> dict[str, _File]:
    pa, pq = _arrow("the parquet format", InvalidArgument)
    types = {"bytes": pa.binary(), "str": pa.string()}

    def arrow(column: _Column) -> Any:
        width = _width(column.kind)
        if isinstance(column.values, Labels):   # dictionary-encoded, read back as str
            return pa.DictionaryArray.from_arrays(
                pa.array(column.values.codes), pa.array(column.values.names, type=pa.string()))
        if width is None:
            return pa.array(column.values, type=types.get(column.kind))
        # Zero-copy: the rows are the values buffer of a fixed-size binary array.
        return pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), len(column.values), [None, pa.py_buffer(column.values)])

    arrays = [arrow(c) for c in columns]
    fixed = [c.name for c in columns if _width(c.kind)]
    other = [c.name for c in columns if not _width(c.kind)]
    # Dictionary pages only where they pay: a column of many distinct
    # values (serials, accounts, token ids) would be tried and dropped at
    # the page limit (a quarter of the time a day's records take to write).
    dictionary = [c.name for c in columns if not _width(c.kind) and _few_values(c)]
    # Plain files: no pandas metadata and no Arrow schema (each type is one
    # Parquet's own annotations give back: unsigned stays unsigned, bytes
    # are BINARY, str STRING, also when written from Labels), the default
    # encodings (dictionary pages where they pay, above).
    # Fixed-width columns hold random bytes: no compression, no dictionary
    # and no min/max statistics (each would cost time and find nothing).
    (name,) = _files("parquet", table, ())
    return {name: _written(directory, name, lambda sink: pq.write_table(
        pa.table(arrays, names=[c.name for c in columns]), pa.PythonFile(sink, mode="w"),
        store_schema=False,
        compression={**{c: "NONE" for c in fixed}, **{c: PARQUET_COMPRESSION for c in other}},
        compression_level={c: PARQUET_COMPRESSION_LEVEL for c in other}
        if PARQUET_COMPRESSION_LEVEL is not None and other else None,
        use_dictionary=dictionary, write_statistics=other))}


_DICTIONARY_SAMPLE = 65_536


def _few_values(column: _Column) -> bool:
    """Whether a sample of the column (spread over all of it) has at most
    one distinct value in four: then Parquet's dictionary encoding is
    worth trying on it."""
    values = column.values
    if isinstance(values, Labels):
        return True   # written as a dictionary anyway
    step = max(1, len(values) // _DICTIONARY_SAMPLE)
    sample = values[::step]
    if sample.dtype == object:
        distinct = len(set(sample.tolist()))
    else:
        distinct = len(np.unique(sample))
    return distinct * 4 <= max(len(sample), 4)


_WRITERS = {"npy": _write_npy, "parquet": _write_parquet}


def _manifest_bytes(fmt: str, number: int, tables: dict[str, _Table], summary: _File) -> bytes:
    body = pack({
        "format": fmt, "version": FORMAT_VERSION, "period": number,
        "summary": list(summary),
        "tables": {name: {"rows": table.rows,
                          "columns": [list(c) for c in table.columns],
                          "files": {f: list(entry) for f, entry in table.files.items()}}
                   for name, table in tables.items()},
    })
    # The manifest checks itself too: any flipped byte in it is found as such.
    return pack([body, _digest_of(body)])


def _digest_of(data: bytes) -> bytes:
    hasher = _digest()
    hasher.update(data)
    return hasher.digest()


def _lock(directory: Path, wait: bool) -> int | None:
    """An fd holding an exclusive flock on a folder: a writer holds its
    temporary folder's until it is renamed, and the sweep removes only folders
    it can lock (their writer is gone). None if not locked (held elsewhere, or
    the folder is gone)."""
    try:
        fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY)
    except OSError:
        return None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        # Removed by a sweep between our open and our lock? Then it is not ours.
        if os.path.samestat(os.fstat(fd), os.stat(directory, follow_symlinks=False)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _sweep(root: Path) -> None:
    """Remove the temporary folders that crashed writes left behind; a folder
    that another writer holds is left alone. Best effort: a leftover that
    cannot be removed is harmless (readers ignore it)."""
    with os.scandir(root) as entries:
        leftovers = [Path(e.path) for e in entries if _TEMP.fullmatch(e.name)]
    for folder in leftovers:
        fd = _lock(folder, wait=False)
        if fd is not None:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(fd)


def _make_root(root: Path) -> None:
    """Create the root and the folders above it that are missing, each synced
    into its parent."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        sync_directory(folder.parent)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")


@contextmanager
def _temporary(root: Path, number: int) -> Iterator[Path]:
    """A new locked temporary folder for period `number`; removed on the way
    out unless it was renamed away."""
    fd: int | None = None
    for _ in range(8):   # a sweep may take a folder between our mkdir and our lock
        temp = root / f".period-{number:06d}.tmp-{secrets.token_hex(8)}"
        temp.mkdir()
        fd = _lock(temp, wait=True)
        if fd is not None:
            break
    if fd is None:
        raise ArchiveUnavailable(f"{root}: temporary folders vanish as they are made")
    try:
        yield temp
    finally:
        try:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
        finally:
            os.close(fd)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no byte written again), or where the file system has
    none, a copy, fsynced."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        with open(source, "rb") as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())


def _format(format: object) -> str:
    if format is not None and not isinstance(format, str):
        raise InvalidArgument(f"format is one of {', '.join(FORMATS)}, not "
                              f"{type(format).__name__}")
    fmt = default_format() if format is None else format
    if fmt not in FORMATS:
        raise InvalidArgument(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        _arrow("the parquet format", InvalidArgument)
    return fmt


class PeriodWriter:
    """Period `number`, written a table at a time: `add` each table (from
    any thread, so a caller can write its biggest table while it works out
    the others), then `commit` with the summary. Used as a context manager,
    a period not committed leaves nothing behind. write_period in one call.

    If the period is archived already, `add` only checks and keeps the
    tables, and `commit` returns the folder when they are that very content
    (PeriodClosed otherwise), as write_period does."""

    def __init__(self, root: str | os.PathLike[str], number: int, *,
                 format: str | None = None) -> None:
        self.number = _number(number)
        self.format = _format(format)
        self.root = _root(root)
        self._final = period_dir(self.root, self.number)
        self._columns: dict[str, list[_Column]] = {}
        self._files: dict[str, dict[str, _File]] = {}
        self._adopted: dict[str, WrittenTable] = {}
        self._guard = threading.Lock()
        self._temporary: contextlib.ExitStack | None = contextlib.ExitStack()
        self._temp: Path | None = None
        with self._failing("open"):
            _make_root(self.root)
            _sweep(self.root)
            if not os.path.lexists(self._final):   # else: compared at commit
                self._temp = self._temporary.enter_context(_temporary(self.root, self.number))

    @contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """OS errors as ArchiveUnavailable; the module's own errors as they are."""
        try:
            yield
        except (InvalidArgument, PeriodClosed, ArchiveUnavailable):
            raise
        except (OSError, ValueError) as exc:
            raise ArchiveUnavailable(f"cannot {what} period {self.number} under "
                                     f"{self.root}: {exc}") from exc

    def add(self, name: str, table: Mapping[str, npt.NDArray[Any]]) -> None:
        """Check and write one table (a name not added before)."""
        ((name, columns),) = _tables({_check_name("a table", name): table}).items()
        self._add(name, columns)

    def _claim(self, name: str) -> None:
        """Take `name` for a table (under the guard)."""
        if self._temporary is None:
            raise InvalidArgument(f"period {self.number}: committed or closed already")
        taken = len(self._columns) + len(self._adopted)
        if name in self._columns or name in self._adopted or taken >= _MAX_NAMES:
            raise InvalidArgument(f"table {name}: added already (or more than "
                                  f"{_MAX_NAMES} tables)")

    def _add(self, name: str, columns: list[_Column]) -> None:
        with self._guard:
            self._claim(name)
            self._columns[name] = columns
        if self._temp is not None:
            with self._failing("write"):
                files = _WRITERS[self.format](self._temp, name, columns)
            with self._guard:
                self._files[name] = files

    def adopt(self, written: WrittenTable, directory: str | os.PathLike[str]) -> None:
        """Make a table write_table wrote into `directory` one of the period's,
        its files hard-linked in, not written again (the archive and
        `directory` are on one file system). The files are trusted to be
        as written: their sizes and digests go in the manifest unread. A
        table of another format is read (checked) and written as the
        period's format."""
        if not isinstance(written, WrittenTable):
            raise InvalidArgument("adopt takes the WrittenTable write_table returned")
        if written.format != self.format:
            self.add(written.name, read_written(directory, written))
            return
        with self._guard:
            self._claim(_check_name("a table", written.name))
            self._adopted[written.name] = written
        if self._temp is not None:
            with self._failing("link a table into"):
                for name in written.files:
                    _link_or_copy(Path(directory, name), self._temp / name)

    def commit(self, summary: bytes) -> Path:
        """Write the summary and the manifest, then put the period in place:
        its folder, once every byte is durable."""
        if not isinstance(summary, bytes):
            raise InvalidArgument("a summary is bytes")
        if self._temporary is None:
            raise InvalidArgument(f"period {self.number}: committed or closed already")
        with self._failing("write"), self._temporary:
            self._temporary = None
            if self._temp is None:
                return _same_or_closed(self._final, self.number, self._columns, summary,
                                       self._adopted)
            if set(self._files) != set(self._columns):
                raise InvalidArgument(f"period {self.number}: a table failed to write")
            entries = {name: _Table(columns[0].rows, [(c.name, c.kind) for c in columns],
                                    self._files[name])
                       for name, columns in self._columns.items()}
            entries.update({name: w._entry() for name, w in self._adopted.items()})
            summary_file = _write_file(self._temp, SUMMARY, summary)
            _write_file(self._temp, MANIFEST, _manifest_bytes(
                self.format, self.number, entries, summary_file))
            sync_directory(self._temp)
            try:
                os.rename(self._temp, self._final)   # fails on a complete (non-empty) folder
            except OSError:
                if os.path.lexists(self._final):   # another writer was first
                    return _same_or_closed(self._final, self.number, self._columns, summary,
                                           self._adopted)
                raise
            sync_directory(self.root)
            return self._final

    def close(self) -> None:
        """Give up a period not committed: its temporary folder goes."""
        if self._temporary is not None:
            stack, self._temporary = self._temporary, None
            stack.close()

    def __enter__(self) -> PeriodWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_period(root: str | os.PathLike[str], number: int, tables: Mapping[str, Table],
                 summary: bytes, *, format: str | None = None) -> Path:
    """Archive period `number`: its tables and its (opaque) summary bytes.
    Returns the period's folder once every byte is durable.

    A period already archived is never overwritten: PeriodClosed, unless it
    holds this very content (the same tables, columns, kinds and values, and
    the same summary; in any format), when its folder is returned: a retry
    after a crash that came between the archive write and the caller's commit.
    `format` is "parquet" or "npy" (default: default_format())."""
    number = _number(number)
    fmt = _format(format)
    if not isinstance(summary, bytes):
        raise InvalidArgument("a summary is bytes")
    columns = _tables(tables)   # every table checked before anything is written
    with PeriodWriter(root, number, format=fmt) as writer:
        for name, checked in columns.items():
            writer._add(name, checked)
        return writer.commit(summary)


def write_table(directory: str | os.PathLike[str], name: str, table: Table, *,
                format: str | None = None) -> WrittenTable:
    """Write one table into `directory` (an existing folder; its files must
    not be there yet), every file fsynced and the folder synced: for a
    period that is still open, to be adopted by its PeriodWriter when it
    closes. Returns what the period's manifest will say of it."""
    fmt = _format(format)
    ((name, columns),) = _tables({_check_name("a table", name): table}).items()
    folder = Path(directory)
    try:
        files = _WRITERS[fmt](folder, name, columns)
        sync_directory(folder)
    except OSError as exc:
        raise ArchiveUnavailable(f"cannot write table {name} under {folder}: {exc}") from exc
    return WrittenTable(fmt, name, columns[0].rows, [(c.name, c.kind) for c in columns],
                        {f: (e.size, e.digest) for f, e in files.items()})


def read_written(directory: str | os.PathLike[str], written: WrittenTable) -> Table:
    """A table write_table wrote, each file checked against `written`."""
    return _LOADERS[written.format](Path(directory), written.name, written._entry())


def _same_or_closed(final: Path, number: int, columns: dict[str, list[_Column]],
                    summary: bytes, adopted: dict[str, WrittenTable] | None = None) -> Path:
    if not os.path.lexists(final / MANIFEST):
        raise ArchiveUnavailable(f"{final} is there without a {MANIFEST}: not a period this "
                                 "archive wrote (nothing was written; move it away)")
    manifest = _open(final, number)
    adopted = adopted or {}
    # An adopted table is compared by its files' digests, not read back.
    same = set(manifest.tables) == set(columns) | set(adopted) and all(
        manifest.tables[name] == w._entry() for name, w in adopted.items())
    stored, stored_summary = _load(final, manifest, list(columns)) if same else ({}, b"")
    same = same and stored_summary == summary
    for table, cols in columns.items() if same else ():
        kinds = manifest.tables[table].columns
        same = same and kinds == [(c.name, c.kind) for c in cols] and all(
            _equal(c.array(), stored[table][c.name]) for c in cols)
    if not same:
        raise PeriodClosed(f"period {number} is archived already, with other content ({final})")
    return final


def _equal(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    if a.dtype == object:
        return b.dtype == object and a.tolist() == b.tolist()
    # Bit for bit: NaN equals the same NaN, 0.0 does not equal -0.0.
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------
# Reading.

def _bad(path: Path, why: str) -> ArchiveUnavailable:
    return ArchiveUnavailable(f"{path}: {why}")


def _checked(path: Path, entry: _File, keep: bool = True) -> bytearray:
    """The file's bytes (none when not `keep`: hashed in chunks), after their
    size and digest match the manifest's. What is checked is what is parsed."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise _bad(path, f"{size} bytes, the manifest says {entry.size}")
            data = bytearray(size if keep else min(size, _CHUNK))
            hasher, done = _digest(), 0
            with memoryview(data) as view:
                while done < size:
                    into = view[done:] if keep else view[:min(_CHUNK, size - done)]
                    got = f.readinto(into)
                    if not got:
                        break
                    hasher.update(into[:got])
                    done += got
            complete = done == size and not f.read(1)
    except FileNotFoundError:
        raise _bad(path, "missing") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    if not complete or hasher.digest() != entry.digest:
        raise _bad(path, "altered (its BLAKE2b digest is not the manifest's)")
    return data if keep else bytearray()


def _open(directory: Path, number: int) -> _Manifest:
    """The period's manifest, checked, after the folder holds exactly the
    files it names."""
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArchiveUnavailable(
            f"period {number} is not in the archive ({path} missing)") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    manifest = _parse(path, data, number)
    expected = {MANIFEST, SUMMARY}.union(*(t.files for t in manifest.tables.values()))
    try:
        found = set(os.listdir(directory))
    except OSError as exc:
        raise _bad(directory, f"cannot be listed ({exc.strerror or exc})") from None
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing:
        raise _bad(directory / missing[0], "missing")
    if unknown:
        raise _bad(directory / unknown[0], "a file the manifest does not name")
    return manifest


def _parse(path: Path, data: bytes, number: int) -> _Manifest:
    try:
        outer = unpack_strict(data, max_array=2, max_str=0)
        if (not isinstance(outer, list) or len(outer) != 2 or not isinstance(outer[0], bytes)
                or outer[1] != _digest_of(outer[0])):
            raise _bad(path, "altered (its own digest does not match)")
        doc = unpack_strict(outer[0], max_map=2 * _MAX_NAMES, max_array=_MAX_NAMES)
        _want(doc, dict, {"format", "version", "period", "summary", "tables"})
        if doc["version"] != FORMAT_VERSION or doc["format"] not in FORMATS:
            raise _bad(path, f"format {doc['format']!r} version {doc['version']!r} is not one "
                             f"this qrpay reads ({', '.join(FORMATS)} version {FORMAT_VERSION})")
        if doc["period"] != number:
            raise _bad(path, f"the manifest of period {doc['period']!r}, not {number}")
        tables = {}
        for name, table in _want(doc["tables"], dict).items():
            _want(table, dict, {"rows", "columns", "files"})
            columns = [(_check_name("a column", c[0]), c[1]) for c in _want(table["columns"], list)
                       if _want(c, list) and len(c) == 2 and _known(c[1])]
            if len(columns) != len(table["columns"]) or not columns:
                raise ValueError("a column is [name, kind]")
            files = {f: _file(entry) for f, entry in _want(table["files"], dict).items()}
            if sorted(files) != sorted(_files(doc["format"], _check_name("a table", name), columns)):
                raise ValueError(f"table {name}: files are not its columns'")
            tables[name] = _Table(_want(table["rows"], int), columns, files)
        return _Manifest(doc["format"], tables, _file(doc["summary"]))
    except ArchiveUnavailable:
        raise
    except (MalformedMessage, InvalidArgument, ValueError, TypeError) as exc:
        raise _bad(path, f"not a manifest this qrpay reads ({exc})") from None


def _want(value: Any, kind: type, keys: set[str] | None = None) -> Any:
    found: Any = value   # not narrowed to `object` by the isinstance below
    if not isinstance(value, kind) or isinstance(value, bool) or (
            keys is not None and set(found) != keys):
        raise ValueError(f"expected {kind.__name__}" + (f" with keys {sorted(keys)}" if keys else ""))
    if isinstance(value, int) and value < 0:
        raise ValueError("a negative count")
    return value


def _file(entry: Any) -> _File:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], bytes)
            and len(entry[1]) == 32):
        raise ValueError("a file entry is [size, 32-byte digest]")
    return _File(_want(entry[0], int), entry[1])


def _read_npy(path: Path, data: bytearray, dtype: np.dtype[Any], rows: int | None,
              width: int | None = None) -> npt.NDArray[Any]:
    """The array of a .npy file's bytes, as np.load(allow_pickle=False) reads
    it but without a copy: a writable view of `data`. With `width`, a 2-D
    array of that many columns."""
    head = io.BytesIO(bytes(data[:_NPY_HEAD]))
    try:
        version = npy_format.read_magic(head)
        read_header = _NPY_HEADERS.get(version)
        if read_header is None:
            raise ValueError(f"version {version} is not one np.save writes here")
        shape, fortran, found = read_header(head)
    except (ValueError, EOFError) as exc:
        raise _bad(path, f"not a .npy file ({exc})") from None
    want = 1 if width is None else 2
    cells = shape[0] * (1 if width is None else width)
    if (found != dtype or fortran or len(shape) != want or rows not in (None, shape[0])
            or (width is not None and shape[1] != width)
            or head.tell() + cells * dtype.itemsize != len(data)):
        raise _bad(path, f"holds {found} x {shape}, not the manifest's "
                         f"{dtype} x {rows if rows is not None else 'n'}")
    array = np.frombuffer(data, dtype=dtype, count=cells, offset=head.tell())
    return array if width is None else array.reshape(shape[0], width)


def _strings(path: Path, raw: bytes, offsets: npt.NDArray[np.int64], kind: str
             ) -> npt.NDArray[Any]:
    if offsets[0] != 0 or offsets[-1] != len(raw) or np.any(np.diff(offsets) < 0):
        raise _bad(path, "offsets that do not cut its data")
    bounds = offsets.tolist()
    items = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    if kind == "str":
        try:
            return _objects([item.decode() for item in items])
        except UnicodeDecodeError:
            raise _bad(path, "data that is not utf-8") from None
    return _objects(items)


def _load_npy(directory: Path, table: str, entry: _Table) -> Table:
    out = {}
    for name, kind in entry.columns:
        if kind in _NUMERIC or _width(kind) is not None:
            path = directory / f"{table}.{name}.npy"
            dtype = np.dtype(np.uint8) if _width(kind) else _NUMERIC[kind].newbyteorder("<")
            out[name] = _read_npy(path, _checked(path, entry.files[path.name]), dtype,
                                  entry.rows, _width(kind))
            continue
        data = directory / f"{table}.{name}.data.npy"
        offsets = directory / f"{table}.{name}.offsets.npy"
        raw = _read_npy(data, _checked(data, entry.files[data.name]), np.dtype(np.uint8), None)
        offs = _read_npy(offsets, _checked(offsets, entry.files[offsets.name]), _OFFSETS,
                         entry.rows + 1)
        out[name] = _strings(data, raw.tobytes(), offs, kind)
    return out


def _load_parquet(directory: Path, table: str, entry: _Table) -> Table:
    pa, pq = _arrow(f"period {directory.name} is archived as parquet: reading it",
                    ArchiveUnavailable)
    path = directory / f"{table}.parquet"
    data = _checked(path, entry.files[path.name])
    try:
        read = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _bad(path, f"not a parquet file pyarrow reads ({exc})") from None
    if read.column_names != [name for name, _ in entry.columns] or read.num_rows != entry.rows:
        raise _bad(path, "columns or rows that are not the manifest's")
    types = {"bytes": (pa.binary(), pa.large_binary()), "str": (pa.string(), pa.large_string())}
    out = {}
    for (name, kind), column in zip(entry.columns, read.columns):
        width = _width(kind)
        wanted = ((pa.binary(width),) if width else types.get(kind)
                  or (pa.from_numpy_dtype(_NUMERIC[kind]),))
        if column.type not in wanted or column.null_count:
            raise _bad(path, f"column {name} is {column.type}, the manifest says {kind}")
        if width:
            whole = column.combine_chunks()
            start = whole.offset * width
            out[name] = np.frombuffer(whole.buffers()[1], dtype=np.uint8)[
                start:start + len(whole) * width].reshape(len(whole), width).copy()
            continue
        values = column.to_numpy()   # an object array of bytes or str for those kinds
        # Writable, as np.load's are: a zero-copy view of Arrow memory is not.
        out[name] = values if values.flags.writeable else values.copy()
    return out


_LOADERS = {"npy": _load_npy, "parquet": _load_parquet}


def _load(directory: Path, manifest: _Manifest, names: list[str]) -> tuple[dict[str, Table], bytes]:
    summary = bytes(_checked(directory / SUMMARY, manifest.summary))
    loader = _LOADERS[manifest.format]
    return {name: loader(directory, name, manifest.tables[name]) for name in names}, summary


def read_period(root: str | os.PathLike[str], number: int, tables: Iterable[str] | None = None
                ) -> tuple[dict[str, Table], bytes]:
    """The tables (all, or those named) and the summary bytes of period
    `number`, each file checked against the manifest first. ArchiveUnavailable,
    naming the file, when anything is missing, altered, unknown or of an
    unknown format; InvalidArgument for a table the period does not have."""
    directory = period_dir(root, number)
    if isinstance(tables, (str, bytes)):
        raise InvalidArgument("tables is an iterable of table names, not one name")
    manifest = _open(directory, number)
    try:
        names = list(manifest.tables) if tables is None else list(dict.fromkeys(tables))
    except TypeError:
        raise InvalidArgument("tables is an iterable of table names") from None
    if not all(isinstance(name, str) for name in names):
        raise InvalidArgument("tables is an iterable of table names (str)")
    for name in names:
        if name not in manifest.tables:
            raise InvalidArgument(f"period {number} has no table {name!r} "
                                  f"(it has {', '.join(manifest.tables) or 'none'})")
    return _load(directory, manifest, names)


def _entry(root: str | os.PathLike[str], number: int, table: str) -> tuple[Path, _Manifest, _Table]:
    directory = period_dir(root, number)
    manifest = _open(directory, number)
    if not isinstance(table, str) or table not in manifest.tables:
        raise InvalidArgument(f"period {number} has no table {table!r} "
                              f"(it has {', '.join(manifest.tables) or 'none'})")
    return directory, manifest, manifest.tables[table]


def table_names(root: str | os.PathLike[str], number: int) -> dict[str, int]:
    """The tables of period `number` and the rows of each, from its manifest."""
    manifest = _open(period_dir(root, number), number)
    return {name: table.rows for name, table in manifest.tables.items()}


def table_rows(root: str | os.PathLike[str], number: int, table: str) -> int:
    """How many rows `table` of period `number` has, from its manifest."""
    return _entry(root, number, table)[2].rows


def read_columns(root: str | os.PathLike[str], number: int, table: str,
                 columns: Iterable[str]) -> Table:
    """Some columns of one table of period `number`, each file checked
    against the manifest first (in the npy format only those columns' files
    are read; a Parquet table is one file, checked and read whole)."""
    directory, manifest, entry = _entry(root, number, table)
    wanted = list(dict.fromkeys(columns)) if not isinstance(columns, (str, bytes)) else None
    known = {name for name, _kind in entry.columns}
    if wanted is None or not all(isinstance(c, str) and c in known for c in wanted):
        raise InvalidArgument(f"columns is an iterable of {table}'s column names: "
                              f"{', '.join(sorted(known))}")
    if manifest.format == "npy":
        return _load_npy(directory, table, entry._replace(
            columns=[(n, k) for n, k in entry.columns if n in wanted]))
    whole = _LOADERS[manifest.format](directory, table, entry)
    return {name: whole[name] for name in wanted}


def verify_period(root: str | os.PathLike[str], number: int) -> None:
    """Re-hash every file of period `number` against its manifest (without
    decoding, so without pyarrow): ArchiveUnavailable naming the first file
    that is missing, altered or unknown."""
    directory = period_dir(root, number)
    manifest = _open(directory, number)
    _checked(directory / SUMMARY, manifest.summary, keep=False)
    for table in manifest.tables.values():
        for name, entry in table.files.items():
            _checked(directory / name, entry, keep=False)


def list_periods(root: str | os.PathLike[str]) -> list[int]:
    """The numbers of the complete periods under `root` (a folder with its
    manifest), ascending; temporary folders of unfinished writes are not periods."""
    root = _root(root)
    try:
        with os.scandir(root) as found:
            entries = list(found)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ArchiveUnavailable(f"{root}: cannot be listed ({exc.strerror or exc})") from None
    numbers = []
    for entry in entries:
        match = _PERIOD.fullmatch(entry.name)
        if (match and entry.name == f"period-{int(match[1]):06d}"
                and int(match[1]) <= _MAX_NUMBER and os.path.isfile(Path(entry.path, MANIFEST))):
            numbers.append(int(match[1]))
    return sorted(numbers)
