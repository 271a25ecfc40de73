"""What every `qrpay` command shares about its output and its input of
times: with `--json`, one JSON document on stdout and nothing else there;
without, a human form on stdout; status lines on stderr, silenced by
`--quiet`; times read as ISO 8601 or Unix seconds and shown as ISO 8601.
docs/CLI.md lists each command's JSON keys."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qrpay.format import U32_MAX

JSON_INDENT = 1


def wants_json(args: argparse.Namespace) -> bool:
    """--json (`simulate --json PATH` writes a file and prints text)."""
    return getattr(args, "json", False) in (True, "-")


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def silent(args: argparse.Namespace) -> bool:
    """No progress bar: --quiet, or --json (whose reader is a program)."""
    return quiet(args) or wants_json(args)


def emit(args: argparse.Namespace, document: Mapping[str, Any],
         human: str | Callable[[], None] | None = None) -> None:
    """The command's result: `document` as JSON on stdout with --json (or
    when the command has no human form); otherwise `human`, a text printed
    on stdout or a function that prints it."""
    if wants_json(args) or human is None:
        print(json.dumps(document, indent=JSON_INDENT, sort_keys=False, default=_plain))
    elif callable(human):
        human()
    else:
        print(human)


def status(args: argparse.Namespace, message: str) -> None:
    """A line for the person at the terminal, on stderr (never with --quiet)."""
    if not quiet(args):
        print(message, file=sys.stderr)


def _plain(value: object) -> object:
    """numpy numbers and arrays as JSON numbers and lists."""
    if isinstance(value, (np.integer, np.floating, np.bool_, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


# -- times ---------------------------------------------------------------------------------

def iso(seconds: int) -> str:
    """Unix seconds as ISO 8601 in UTC: 2027-01-15T08:30:00Z."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> int:
    """An argparse type: Unix seconds (`1800000000`) or an ISO 8601 time
    (`2027-01-15T08:30:00Z`, `2027-01-15T16:30+08:00`, `2027-01-15`; no
    zone means UTC), within what a u32 holds (until 2106-02-07)."""
    value = text.strip()
    if value.isdigit():
        seconds = int(value)
    else:
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither Unix seconds nor an ISO 8601 time "
                "(2027-01-15T08:30:00Z, 2027-01-15T16:30+08:00, 2027-01-15)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = int(when.timestamp())
        if seconds < 0:
            raise argparse.ArgumentTypeError(f"{text} is before 1970")
    if seconds > U32_MAX:
        raise argparse.ArgumentTypeError(
            f"{seconds} must be at most {U32_MAX} (Unix seconds end at 2**32-1, "
            f"{iso(U32_MAX)})")
    return seconds
