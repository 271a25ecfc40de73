"""Progress bars for the long commands: a tqdm bar on stderr with the
count, rate and time left, drawn only when stderr is a terminal (never in a
pipe or a log file, where the bar's carriage returns would be noise)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

Progress = Callable[[int, int], None]


class _Bar:
    """A `progress(done, total)` callback drawing one tqdm bar, made at the
    first call (the total is known only then)."""

    def __init__(self, what: str, unit: str, stream: TextIO) -> None:
        self._what, self._unit, self._stream = what, unit, stream
        self._bar: Any = None

    def __call__(self, done: int, total: int, what: str | None = None) -> None:
        if self._bar is None:
            tqdm: Any = importlib.import_module("tqdm").tqdm   # untyped
            self._bar = tqdm(total=total, desc=self._what, unit=self._unit, file=self._stream,
                             dynamic_ncols=True, leave=True)
        if self._bar.total != total:
            self._bar.total = total
        if what is not None:
            self._bar.set_description_str(what, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def progress_bar(what: str, unit: str = "task", *, quiet: bool = False,
                 stream: TextIO | None = None) -> Iterator[_Bar | None]:
    """A `progress(done, total)` callback drawing a bar on `stream`
    (stderr) while the block runs, or None when the stream is not a terminal
    or `quiet` is set: pass it straight to the functions that take one. A
    third argument, when given, names the step under way."""
    stream = sys.stderr if stream is None else stream
    if quiet or not stream.isatty():
        yield None
        return
    bar = _Bar(what, unit, stream)
    try:
        yield bar
    finally:
        bar.close()
