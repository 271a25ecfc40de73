"""Argument checks the compiled core, its pure-Python twin and the public API
share, so that both cores refuse the same values with the same typed error at
the same call (InvalidArgument, or InvalidKey for a key's bytes) instead of
whatever a C conversion or numpy happens to raise. Batch inputs are copied
here: a core verifies arrays that no other thread can write to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from qrpay.errors import InvalidArgument, InvalidKey
from qrpay.format import MAX_TIME, PUBLIC_KEY_LEN, TOKEN_LEN, U32_MAX

MAX_THREADS = 256
"""The most threads any call takes."""
MIN_SHARE = 8
"""Work items (tokens) per thread at least: a call starts a thread only for a
share of 8 or more, never one thread per token."""
CACHE_WAYS = 4
MAX_CACHE_SIZE = 2**22
"""Credentials a verifier's cache may hold (about 550 MB in the compiled core)."""

TrustRow = tuple[int, bytes, int, int, int]


def is_int(value: object) -> bool:
    """A Python or numpy integer; not a bool (True is not a count of seconds)."""
    return (isinstance(value, (int, np.integer))
            and not isinstance(value, (bool, np.bool_)))


def integer(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int in [low, high], or InvalidArgument."""
    if not is_int(value) or not low <= cast(int, value) <= high:
        raise InvalidArgument(f"{name} must be an integer in [{low}, {high}], not {value!r:.80}")
    return int(cast(int, value))


def is_time(value: object) -> bool:
    """Unix seconds in [0, 2**40]: an integer or a finite float (Python or
    numpy), never a bool, a string or None."""
    if is_int(value):
        return 0 <= cast(int, value) <= MAX_TIME
    if isinstance(value, (float, np.floating)):
        return bool(math.isfinite(value) and 0 <= value <= MAX_TIME)
    return False


def items(name: str, values: object) -> list[Any]:
    """The items of an iterable argument (not a str or bytes, which iterate
    as characters or ints), or InvalidArgument."""
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{name} must be a sequence, not {type(values).__name__}")
    try:
        return list(cast(Iterable[Any], values))
    except TypeError:       # not iterable (a 0-d array says so only when iterated)
        raise InvalidArgument(f"{name} must be a sequence, not {type(values).__name__}") from None


def real(value: object) -> float:
    """float(value), but a complex number is a TypeError (float() of a numpy
    complex drops the imaginary part with only a warning)."""
    if isinstance(value, (complex, np.complexfloating)):
        raise TypeError("a complex number is not a real number")
    return float(value)  # type: ignore[arg-type]


def threads(value: object) -> int:
    return integer("threads", value, 1, MAX_THREADS)


def units(n: int) -> int:
    """How many thread shares n work items make (see MIN_SHARE)."""
    return (n + MIN_SHARE - 1) // MIN_SHARE


def cache_size(value: object) -> int:
    return integer("cache_size", value, CACHE_WAYS, MAX_CACHE_SIZE)


def trust_rows(rows: Iterable[TrustRow]) -> list[TrustRow]:
    """Rows (kid as a little-endian u32, public key, not_before, not_after,
    roles) as the cores store them, each field checked to fit."""
    out = []
    for row in items("trust rows", rows):
        if not isinstance(row, tuple) or len(row) != 5:
            raise InvalidArgument("a trust row is (kid, public key, not_before, not_after, roles)")
        kid, pk, not_before, not_after, roles = row
        if not isinstance(pk, bytes) or len(pk) != PUBLIC_KEY_LEN:
            raise InvalidKey(f"a trusted public key must be {PUBLIC_KEY_LEN} bytes")
        out.append((integer("kid", kid, 0, U32_MAX), pk,
                    integer("not_before", not_before, 0, MAX_TIME),
                    integer("not_after", not_after, 0, MAX_TIME),
                    integer("roles", roles, 0, U32_MAX)))
    return out


def batch(tokens: object, lengths: object, now: object
          ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A core's batch inputs as private copies: tokens an (n, TOKEN_LEN) uint8
    array, lengths n integers, now one integer time or one per token in
    [0, 2**40]. Copied, so a caller's thread that rewrites its arrays during
    the call cannot change what is verified (or what enters the cache)."""
    if (not isinstance(tokens, np.ndarray) or tokens.dtype != np.uint8 or tokens.ndim != 2
            or tokens.shape[1] != TOKEN_LEN):
        raise InvalidArgument(f"tokens must be an (n, {TOKEN_LEN}) uint8 array")
    n = tokens.shape[0]
    if (not isinstance(lengths, np.ndarray) or lengths.dtype.kind not in "iu"
            or lengths.shape != (n,)):
        raise InvalidArgument("lengths must be an integer array with one length per token")
    times = np.asarray(now)
    if times.dtype.kind not in "iu" or times.ndim > 1 or (times.ndim == 1 and len(times) != n):
        raise InvalidArgument("now is an integer, or one integer per token")
    # Copied first, then checked: what is checked is what the core reads.
    own_tokens = np.array(tokens, dtype=np.uint8, order="C", copy=True)
    own_lengths = np.array(lengths, order="C", copy=True)
    own_times = np.array(np.broadcast_to(times, (n,)), order="C", copy=True)
    # Checked before narrowing to int64: a uint64 2**64 - 1 must not become -1.
    if n and (own_lengths.min() < -1 or own_lengths.max() > 2**62):
        raise InvalidArgument("lengths must be in [-1, 2**62]")
    if n and (own_times.min() < 0 or own_times.max() > MAX_TIME):
        raise InvalidArgument("now must be in [0, 2**40]")
    return (own_tokens, own_lengths.astype(np.int64, copy=False),
            own_times.astype(np.int64, copy=False))
