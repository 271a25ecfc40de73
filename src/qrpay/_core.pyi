# Hand-written stubs for the compiled core (stubgen cannot read Cython).
# _ref.py implements the same names in pure Python.

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

TrustRow = tuple[int, bytes, int, int, int]

LAYOUT: dict[str, int]

class Verifier:
    hits: int
    misses: int
    def __init__(self, trust_rows: Iterable[TrustRow], cache_size: int = 65536) -> None: ...
    @property
    def cache_capacity(self) -> int: ...
    def verify_one(self, token: bytes, now: int, max_age: int, skew: int) -> int: ...
    def verify_many(
        self,
        tokens: npt.NDArray[np.uint8],
        lengths: npt.NDArray[np.int64],
        now: int | npt.NDArray[np.int64],
        max_age: int,
        skew: int,
        threads: int = 1,
    ) -> npt.NDArray[np.uint8]: ...

def make_token(
    credential: bytes, secret_key: bytes, issued_at: int, counter: int, scene: int
) -> bytes: ...
def make_tokens(
    credentials: npt.NDArray[np.uint8],
    secret_keys: npt.NDArray[np.uint8],
    issued_at: npt.NDArray[np.uint32],
    counters: npt.NDArray[np.uint32],
    scenes: npt.NDArray[np.uint8],
    threads: int = 1,
) -> npt.NDArray[np.uint8]: ...
def sign_detached(secret_key: bytes, message: bytes) -> bytes: ...
def verify_detached(public_key: bytes, message: bytes, signature: bytes) -> bool: ...
def is_valid_point(point: bytes) -> bool: ...
def sorted_contains(
    haystack: npt.NDArray[np.uint64], needles: npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]: ...
def _split(work: Any, n: int, threads: int) -> None: ...
def score_rows(
    X: npt.NDArray[np.floating[Any]],
    edges: npt.NDArray[np.float64],
    edge_off: npt.NDArray[np.int64],
    points: npt.NDArray[np.int32],
    point_off: npt.NDArray[np.int64],
    specials: npt.NDArray[np.float64],
    special_off: npt.NDArray[np.int64],
    best: npt.NDArray[np.int32],
    code_limit: npt.NDArray[np.float64],
    base: int,
    k: int,
    threads: int = 1,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]: ...
