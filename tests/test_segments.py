"""qrpay._segments.search answers as np.searchsorted does, on both sides of
the size from which it sorts the queries first."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qrpay import _segments


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 2**64 - 1), max_size=300),
       seed=st.integers(0, 2**32 - 1), many=st.booleans())
def test_search_is_searchsorted(keys: list[int], seed: int, many: bool) -> None:
    rng = np.random.default_rng(seed)
    hay = np.unique(np.array(keys, dtype=np.uint64))
    n = _segments._SORTED_SEARCH_FROM + 17 if many else int(rng.integers(0, 50))
    # Queries: keys present, neighbours of keys, and anything at all.
    pool = np.r_[hay, hay + np.uint64(1), rng.integers(0, 2**64 - 1, 50, dtype=np.uint64,
                                                        endpoint=True)]
    queries = pool[rng.integers(0, len(pool), n)]
    assert np.array_equal(_segments.search(hay, queries), np.searchsorted(hay, queries))
