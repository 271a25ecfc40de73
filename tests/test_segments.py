"""qrpay._segments.stable_order answers as np.argsort(kind="stable") does:
random keys, keys with many ties, signed and unsigned, none and one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qrpay import _segments


@settings(max_examples=80, deadline=None)
@given(keys=st.lists(st.integers(0, 2**64 - 1), max_size=400),
       ties=st.integers(1, 50), signed=st.booleans())
def test_stable_order_is_a_stable_argsort(keys: list[int], ties: int, signed: bool) -> None:
    values = np.array(keys, dtype=np.uint64) % np.uint64(ties if ties < 50 else 2**63)
    if signed:
        values = values.astype(np.int64) - 7
    got = _segments.stable_order(values)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.argsort(values, kind="stable"))


def test_stable_order_on_a_million_serials_with_repeats() -> None:
    rng = np.random.default_rng(3)
    serials = rng.integers(0, 2**64 - 1, 200_000, dtype=np.uint64, endpoint=True)
    keys = serials[rng.integers(0, len(serials), 1_000_000)]
    assert np.array_equal(_segments.stable_order(keys), np.argsort(keys, kind="stable"))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(-2**40, 2**40)),
                     max_size=300), few=st.booleans())
def test_lexsorted_is_lexsort(rows: list[tuple[int, int]], few: bool) -> None:
    primary = np.array([r[0] for r in rows], dtype=np.uint64)
    secondary = np.array([r[1] for r in rows], dtype=np.int64)
    if few:   # many ties in both keys
        primary, secondary = primary % np.uint64(3), secondary % 4
    assert np.array_equal(_segments.lexsorted(primary, secondary),
                          np.lexsort((secondary, primary)))
