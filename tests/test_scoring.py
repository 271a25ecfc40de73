"""Scorecards (qrpay.scoring): scores and reason codes against a plain numpy
reference written here, the compiled kernel against its pure-Python twin,
card documents (JSON, msgpack, canonical bytes, card_id, signing), input
checks, limit policies, and the drift and ranking statistics.

The suite runs once per backend (plain, and QRPAY_NO_EXTENSIONS=1), so
`Scorecard.score` / `explain` are checked on the compiled core and on _ref.
The reference below does not use _ref.py; benchmarks/test_bench_scoring.py
loads this module to time the same reference as its baseline.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qrpay
from qrpay import IssuerKey, Role, Scene, TrustStore, _ref
from qrpay.credential import Credential
from qrpay.errors import (
    BadSignature,
    InvalidArgument,
    IssuerKeyRole,
    MalformedMessage,
    QrPayError,
    UnknownKeyId,
)
from qrpay.scoring import (
    CategoryBins,
    FeatureBins,
    LimitBand,
    LimitPolicy,
    Scorecard,
    _flatten,
    auc,
    feature_psi,
    psi,
)

NOW = 1_800_000_000

# Kept here rather than imported from tests/conftest.py: benchmarks/test_bench_scoring.py
# loads this file as a plain module, where `conftest` is the benchmarks' own.
NO_EXTENSIONS = os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0")


def compiled_core() -> ModuleType:
    """qrpay._core: failing to import it is a test failure, unless the
    pure-Python twin was asked for and the extension really is not built."""
    try:
        return importlib.import_module("qrpay._core")
    except ImportError as exc:
        if NO_EXTENSIONS:
            pytest.skip(f"QRPAY_NO_EXTENSIONS is set and qrpay._core is not built ({exc})")
        raise


# ============================================================================
# The reference scorer: plain numpy, one searchsorted per feature
# ============================================================================

def reference_feature_points(f: FeatureBins | CategoryBins, column: npt.ArrayLike
                             ) -> npt.NDArray[np.int64]:
    """The points one feature gives each value of a column. Numeric bin =
    searchsorted(edges, x, side="right"); a special code takes its own bin
    (before any numeric bin); NaN takes the missing bin. float32 values are
    compared as float64, as the kernel does. A categorical feature's value
    is a code: a whole number from 0 to K (K = unseen), NaN missing,
    anything else unseen."""
    v = np.asarray(column).astype(np.float64)
    if isinstance(f, CategoryBins):
        group_of = np.repeat(np.arange(len(f.groups)), [len(g) for g in f.groups])
        table = np.array([*f.group_points, f.unseen_points, f.missing_points], dtype=np.int64)
        b = np.full(len(v), len(f.groups))
        with np.errstate(invalid="ignore"):
            known = (v >= 0) & (v < len(group_of)) & (v == np.floor(v))
        b[known] = group_of[v[known].astype(np.intp)]
        b[np.isnan(v)] = len(f.groups) + 1
        return table[b]
    n_edges = len(f.edges)
    table = np.array([*f.points, f.missing_points, *(p for _, p in f.specials)], dtype=np.int64)
    b = np.searchsorted(np.asarray(f.edges, dtype=np.float64), v, side="right")
    for s, (code, _points) in enumerate(f.specials):   # codes are distinct
        b[v == code] = n_edges + 2 + s
    b[np.isnan(v)] = n_edges + 1
    return table[b]


def reference_points(card: Scorecard, X: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """(rows, features): the points of each feature's bin."""
    X = np.asarray(X)
    out = np.empty(X.shape, dtype=np.int64)
    for j, f in enumerate(card.features):
        out[:, j] = reference_feature_points(f, X[:, j])
    return out


def reference_score(card: Scorecard, X: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Scores: base points plus each feature's points, summed column by column
    (the benchmark's numpy baseline)."""
    X = np.asarray(X)
    total = np.full(len(X), card.base_points, dtype=np.int64)
    for j, f in enumerate(card.features):
        total += reference_feature_points(f, X[:, j])
    return total


def reference_reasons(card: Scorecard, points: npt.NDArray[np.int64], k: int
                      ) -> npt.NDArray[np.int16]:
    """Per row, the k features with the largest loss (best points of the
    feature - points it got), ties to the lower feature index, only losses > 0,
    padded with -1."""
    n, m = points.shape
    best = np.array([max((*f.points, f.missing_points, *(p for _, p in f.specials)))
                     for f in card.features], dtype=np.int64)
    loss = best[None, :] - points
    assert (loss >= 0).all()
    # One key per (row, feature), unique in a row: larger loss first, then lower index.
    key = loss * m + (m - 1 - np.arange(m, dtype=np.int64))[None, :]
    order = np.argsort(-key, axis=1)[:, :k]
    top = np.take_along_axis(loss, order, axis=1)
    return np.where(top > 0, order, -1).astype(np.int16)


def reference_explain(card: Scorecard, X: npt.ArrayLike, k: int
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    points = reference_points(card, X)
    return card.base_points + points.sum(axis=1), reference_reasons(card, points, k)


def test_reference_by_hand() -> None:
    """The reference itself, on a card small enough to score by hand."""
    card = Scorecard((
        FeatureBins("age", (25.0, 40.0), (-10, 5, 20), missing_points=0,
                    specials=((-1.0, -20),)),
        FeatureBins("late", (1.0,), (30, -30), missing_points=-5),
    ), base_points=500)
    X = np.array([[24.9, 0.0],       # age bin 0 (-10), late bin 0 (30)
                  [25.0, 1.0],       # an edge value goes right: 5, -30
                  [-1.0, np.nan],    # special -20, missing -5
                  [np.inf, -np.inf],  # last bin 20, first bin 30
                  [40.0, 0.5]])      # 20, 30
    assert reference_score(card, X).tolist() == [520, 475, 475, 550, 550]
    # Losses against best (20 and 30): [30, 0], [15, 60], [40, 35], [0, 0], [0, 0].
    assert reference_reasons(card, reference_points(card, X), 2).tolist() == [
        [0, -1], [1, 0], [0, 1], [-1, -1], [-1, -1]]
    scores, reasons = card.explain(X, k=2)
    assert scores.tolist() == [520, 475, 475, 550, 550]
    assert reasons.tolist() == [[0, -1], [1, 0], [0, 1], [-1, -1], [-1, -1]]
    assert card.reason_names(reasons)[1] == ["late", "age"]


def test_ties_go_to_the_lower_feature_index() -> None:
    card = Scorecard(tuple(FeatureBins(f"f{i}", (0.0,), (0, 10), 0) for i in range(5)), 0)
    X = np.array([[0.5, -1.0, -1.0, 0.5, -1.0]])   # features 1, 2, 4 each lose 10
    scores, reasons = card.explain(X, k=3)
    assert scores.tolist() == [20]
    assert reasons.tolist() == [[1, 2, 4]]
    assert card.explain(X, k=2)[1].tolist() == [[1, 2]]
    assert card.explain(X, k=5)[1].tolist() == [[1, 2, 4, -1, -1]]


# ============================================================================
# 1,000,000 rows: float64/float32, C/Fortran, threads 1/2
# ============================================================================

def _big_card() -> Scorecard:
    rng = np.random.default_rng(20270115)
    features = []
    for f in range(8):
        n_edges = (0, 1, 3, 5, 6, 7, 8, 4)[f]
        edges = np.sort(rng.choice(np.arange(-20, 21), n_edges, replace=False) * 2.5)
        # At most 2 codes per feature: the fast kernel's limit, so these million-row
        # checks run the kernel fitted cards use (_row_kernel_card covers the other).
        codes = ((-999.0, int(rng.integers(-40, 10))), (-1.0, int(rng.integers(-40, 10))),
                 (np.inf, -50))
        specials = [codes[s] for s in ((), (0,), (1, 2), (0, 2))[f % 4]]
        if f == 7:
            specials = [(float(edges[2]), 11)]        # a special code equal to an edge
        features.append(FeatureBins(
            f"x{f}", tuple(float(e) for e in edges),
            tuple(int(p) for p in rng.integers(-60, 60, n_edges + 1)),
            int(rng.integers(-60, 60)), tuple(specials)))
    return Scorecard(tuple(features), base_points=600)


def _row_kernel_card(card: Scorecard) -> Scorecard:
    """The same card with a third special code on one feature: too many for the
    fast kernel, so it is scored by the row-by-row kernel."""
    f = card.features[3]
    crowded = FeatureBins(f.name, f.edges, f.points, f.missing_points,
                          ((-1.0, 9), *f.specials))
    return Scorecard((*card.features[:3], crowded, *card.features[4:]), card.base_points)


def _tricky_matrix(card: Scorecard, n: int, seed: int) -> npt.NDArray[np.float64]:
    """Values mostly random, and then: exact edges and their float neighbours,
    special codes, NaN, +-inf, +-0.0."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 30.0, (n, len(card.features)))
    for j, f in enumerate(card.features):
        col = X[:, j]
        pick = rng.random(n)
        edges = np.asarray(f.edges, dtype=np.float64)
        if len(edges):
            at = pick < 0.08
            e = edges[rng.integers(0, len(edges), at.sum())]
            col[at] = np.nextafter(e, np.where(rng.random(at.sum()) < 0.5, -np.inf, np.inf))
            exact = pick < 0.05
            col[exact] = edges[rng.integers(0, len(edges), exact.sum())]
        if f.specials:
            codes = np.array([c for c, _ in f.specials])
            sp = (pick >= 0.08) & (pick < 0.11)
            col[sp] = codes[rng.integers(0, len(codes), sp.sum())]
        col[(pick >= 0.11) & (pick < 0.13)] = np.nan
        col[(pick >= 0.13) & (pick < 0.135)] = np.inf
        col[(pick >= 0.135) & (pick < 0.14)] = -np.inf
        col[(pick >= 0.14) & (pick < 0.145)] = -0.0
    return X


def _best_value(f: FeatureBins) -> float:
    """A value that lands in the feature's best bin."""
    table = [*f.points, f.missing_points, *(p for _, p in f.specials)]
    b = table.index(max(table))
    if b == len(f.edges) + 1:
        return math.nan
    if b > len(f.edges):
        return f.specials[b - len(f.edges) - 2][0]
    low = f.edges[b - 1] if b else (f.edges[0] if f.edges else 0.0) - 1.0
    high = f.edges[b] if b < len(f.edges) else low + 2.0
    value = low
    codes = {c for c, _ in f.specials}
    while value in codes:
        value = (value + high) / 2
    return value


@pytest.fixture(scope="module")
def million() -> dict[str, Any]:
    card = _big_card()
    X64 = _tricky_matrix(card, 1_000_000, seed=1)
    # Rows where no feature (or only one) loses points: reasons padded with -1.
    X64[:1_000] = [_best_value(f) for f in card.features]
    X64[1_000:2_000] = X64[:1_000]
    X64[1_000:2_000, 3] = X64[2_000:3_000, 3]
    X32 = X64.astype(np.float32)
    return {"card": card,
            "float64": (X64, *reference_explain(card, X64, 3)),
            "float32": (X32, *reference_explain(card, X32, 3))}


def test_million_rows_cover_every_kind_of_value(million: dict[str, Any]) -> None:
    X = million["float64"][0]
    assert np.isnan(X).mean() > 0.015 and np.isposinf(X).any() and np.isneginf(X).any()
    card = million["card"]
    for j, f in enumerate(card.features):
        if f.edges:
            assert np.isin(X[:, j], f.edges).sum() > 10_000
        for code, _ in f.specials:
            assert (X[:, j] == code).sum() > 3_000
    # and the reasons are not all padding
    reasons = million["float64"][2]
    assert (reasons[:, 2] >= 0).mean() > 0.3
    assert (reasons[:1_000] == -1).all()
    assert ((reasons[1_000:2_000, 0] == 3) | (reasons[1_000:2_000, 0] == -1)).all()
    assert (reasons[1_000:2_000, 0] == 3).sum() > 500 and (reasons[1_000:2_000, 1] == -1).all()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("threads", [1, 2])
def test_million_rows_match_the_reference(million: dict[str, Any], dtype: str, order: str,
                                          threads: int) -> None:
    card: Scorecard = million["card"]
    X, want_scores, want_reasons = million[dtype]
    X = np.asfortranarray(X) if order == "F" else np.ascontiguousarray(X)
    assert X.dtype == np.dtype(dtype)
    assert X.flags.f_contiguous if order == "F" else X.flags.c_contiguous
    scores = card.score(X, threads=threads)
    assert scores.dtype == np.int64 and scores.shape == (len(X),)
    assert np.array_equal(scores, want_scores)
    scores, reasons = card.explain(X, k=3, threads=threads)
    assert reasons.dtype == np.int16 and reasons.shape == (len(X), 3)
    assert np.array_equal(scores, want_scores)
    assert np.array_equal(reasons, want_reasons)


def test_other_layouts_and_dtypes(million: dict[str, Any]) -> None:
    card: Scorecard = million["card"]
    X, want, _ = million["float64"]
    rows = slice(0, 20_000)
    # A strided view, a big-endian copy, ints, a list of lists.
    wide = np.empty((20_000, 2 * len(card.features)))
    wide[:, ::2] = X[rows]
    assert np.array_equal(card.score(wide[:, ::2], threads=2), want[rows])
    assert np.array_equal(card.score(X[rows].astype(">f8")), want[rows])
    assert np.array_equal(card.score(X[:1000][::-1]), want[:1000][::-1])
    # Negative strides over many blocks (the fast path prefetches the next block),
    # rows and columns: the card with its features reversed sees the same rows.
    backwards = Scorecard(tuple(reversed(card.features)), card.base_points)
    assert np.array_equal(card.score(X[:5000][::-1]), want[:5000][::-1])
    assert np.array_equal(backwards.score(X[rows, ::-1], threads=2), want[rows])
    assert np.array_equal(backwards.score(np.asfortranarray(X[rows])[::-1, ::-1]),
                          want[rows][::-1])
    _, want_reasons = reference_explain(card, X[rows], 3)
    scores, reasons = card.explain(wide[:, ::2], k=3, threads=2)
    assert np.array_equal(scores, want[rows]) and np.array_equal(reasons, want_reasons)
    ints = np.arange(-50, 50).repeat(len(card.features)).reshape(-1, len(card.features))
    assert np.array_equal(card.score(ints), reference_score(card, ints.astype(np.float64)))
    assert np.array_equal(card.score(X[:50].tolist()), want[:50])
    # The row kernel (a card the fast kernel cannot take) on the same layouts.
    crowded = _row_kernel_card(card)
    for view in (X[:5000], X[:5000][::-1], np.asfortranarray(X[:5000]),
                 X[:5000].astype(np.float32)):
        scores, reasons = crowded.explain(view, k=3, threads=2)
        want_scores, want_reasons = reference_explain(crowded, view, 3)
        assert np.array_equal(scores, want_scores) and np.array_equal(reasons, want_reasons)
    # Empty input, and more threads than rows.
    assert card.score(X[:0]).shape == (0,)
    assert card.explain(X[:0], k=2)[1].shape == (0, 2)
    assert np.array_equal(card.score(X[:3], threads=8), want[:3])


# ============================================================================
# Hypothesis: random cards and inputs
# ============================================================================

EDGE_VALUES = st.one_of(st.integers(-4, 4).map(float),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.floats(-1e3, 1e3, allow_nan=False, width=32).map(float))
POINTS = st.one_of(st.integers(-3, 3), st.integers(-1_000_000, 1_000_000))


@st.composite
def features(draw: st.DrawFn, name: str, finite: bool = False) -> FeatureBins | CategoryBins:
    if draw(st.integers(0, 3)) == 0:   # a categorical feature: up to 12 groups (> 8: row kernel)
        sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=12))
        names = iter(f"{name}c{i}" for i in range(sum(sizes)))
        return CategoryBins(name, tuple(tuple(next(names) for _ in range(s)) for s in sizes),
                            tuple(draw(POINTS) for _ in sizes), draw(POINTS), draw(POINTS))
    edges = sorted(draw(st.lists(EDGE_VALUES, max_size=8, unique=True)))
    code_values = EDGE_VALUES if finite else st.one_of(
        EDGE_VALUES, st.sampled_from([math.inf, -math.inf]))
    codes = draw(st.lists(st.one_of(code_values, st.sampled_from(edges or [0.0])),
                          max_size=3, unique=True))
    return FeatureBins(
        name, tuple(edges), tuple(draw(st.lists(POINTS, min_size=len(edges) + 1,
                                                max_size=len(edges) + 1))),
        draw(POINTS), tuple((c, draw(POINTS)) for c in codes))


@st.composite
def cards(draw: st.DrawFn, finite: bool = False) -> Scorecard:
    n = draw(st.integers(1, 12))
    return Scorecard(tuple(draw(features(f"f{i}", finite)) for i in range(n)),
                     draw(st.integers(-10**9, 10**9)))


def _codes(f: FeatureBins | CategoryBins) -> list[float]:
    """A categorical feature's codes and the numbers either side of them."""
    if not isinstance(f, CategoryBins):
        return []
    return [float(c) for c in range(-1, len(f.categories) + 2)]


@st.composite
def cards_and_inputs(draw: st.DrawFn) -> tuple[Scorecard, npt.NDArray[Any]]:
    card = draw(cards())
    rows = draw(st.integers(0, 40))
    columns = []
    for f in card.features:
        interesting = [*f.edges, *(c for c, _ in f.specials), math.nan, math.inf, -math.inf,
                       0.0, -0.0, *_codes(f)]
        with np.errstate(over="ignore"):
            near = [float(np.nextafter(e, d)) for e in f.edges for d in (-np.inf, np.inf)]
        value = st.one_of(st.sampled_from(interesting), st.sampled_from(near or [1.0]),
                          st.floats(allow_nan=True, allow_infinity=True))
        columns.append(draw(st.lists(value, min_size=rows, max_size=rows)))
    X = np.array(columns, dtype=np.float64).T.reshape(rows, len(card.features))
    if draw(st.booleans()):
        with np.errstate(over="ignore"):
            X = X.astype(np.float32)
    if draw(st.booleans()):
        X = np.asfortranarray(X)
    return card, X


@given(cards_and_inputs(), st.integers(0, 8), st.integers(1, 3))
def test_random_cards_match_the_reference(case: tuple[Scorecard, npt.NDArray[Any]], k: int,
                                          threads: int) -> None:
    card, X = case
    k = min(k, len(card.features))
    want_scores, want_reasons = reference_explain(card, X, k)
    assert np.array_equal(card.score(X, threads=threads), want_scores)
    scores, reasons = card.explain(X, k=k, threads=threads)
    assert np.array_equal(scores, want_scores)
    assert reasons.shape == (len(X), k) and np.array_equal(reasons, want_reasons)


@given(cards(), st.integers(0, 8), st.integers(1, 3), st.integers(0, 2**32 - 1), st.booleans())
@settings(max_examples=40, deadline=None)
def test_random_cards_over_many_blocks(card: Scorecard, k: int, threads: int, seed: int,
                                       fortran: bool) -> None:
    """4,000 rows, so every thread's share spans several kernel blocks and
    ends in a partial one; values drawn from edges, their neighbours, codes,
    NaN, infinities and noise."""
    rng = np.random.default_rng(seed)
    rows = 4_000
    X = np.empty((rows, len(card.features)), order="F" if fortran else "C")
    for j, f in enumerate(card.features):
        edges = np.array(f.edges, dtype=np.float64)
        with np.errstate(over="ignore"):
            near = np.r_[np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)]
        pool = np.r_[edges, near, [c for c, _ in f.specials], np.nan, np.inf, -np.inf, 0.0,
                     _codes(f)]
        X[:, j] = np.where(rng.random(rows) < 0.7, rng.choice(pool, rows),
                           rng.normal(0.0, 10.0 ** rng.integers(0, 6), rows))
    k = min(k, len(card.features))
    want_scores, want_reasons = reference_explain(card, X, k)
    assert np.array_equal(card.score(X, threads=threads), want_scores)
    scores, reasons = card.explain(X, k=k, threads=threads)
    assert np.array_equal(scores, want_scores) and np.array_equal(reasons, want_reasons)


def test_backend_is_the_one_asked_for() -> None:
    from qrpay._impl import core
    if NO_EXTENSIONS:
        assert qrpay.backend == "python" and core is _ref
    else:
        assert qrpay.backend == "cython", "qrpay._core did not import: the twin is in use"
        assert core is compiled_core()
        assert hasattr(core, "score_rows")


@given(cards_and_inputs(), st.integers(0, 8), st.integers(1, 3))
@settings(max_examples=200)
def test_compiled_kernel_matches_the_twin(case: tuple[Scorecard, npt.NDArray[Any]], k: int,
                                          threads: int) -> None:
    compiled = compiled_core()
    card, X = case
    k = min(k, len(card.features))
    flat = _flatten(card)
    ours = compiled.score_rows(X, *flat, card.base_points, k, threads)
    theirs = _ref.score_rows(X, *flat, card.base_points, k, threads)
    assert np.array_equal(ours[0], theirs[0]) and ours[0].dtype == theirs[0].dtype
    assert np.array_equal(ours[1], theirs[1]) and ours[1].dtype == theirs[1].dtype
    assert ours[1].shape == theirs[1].shape == (len(X), k)


@pytest.mark.parametrize("core_name", ["compiled", "twin"])
def test_kernels_refuse_bad_arguments(core_name: str) -> None:
    core = compiled_core() if core_name == "compiled" else _ref
    card = _big_card()
    flat = _flatten(card)
    X = np.zeros((4, len(card.features)))
    for bad_x in (X[:, :3], X.astype(np.int64), X[0], X.astype(np.float16)):
        with pytest.raises(InvalidArgument):
            core.score_rows(bad_x, *flat, 0, 0, 1)
    for k in (-1, 9):
        with pytest.raises(InvalidArgument):
            core.score_rows(X, *flat, 0, k, 1)


# ============================================================================
# Card documents
# ============================================================================

def _card() -> Scorecard:
    return Scorecard((
        FeatureBins("utilisation", (0.1, 0.3, 0.5, 0.8), (40, 30, 15, 0, -20), missing_points=5,
                    specials=((-1.0, 10),), woe=(0.9, 0.5, 0.1, -0.4, -0.9, 0.2, 0.3),
                    iv=0.31, trend="decreasing"),
        FeatureBins("months_on_book", (6.0, 12.0, 36.0), (-15, 0, 10, 25), missing_points=-5),
        FeatureBins("late_90d", (1.0, 2.0), (30, -10, -40), missing_points=0,
                    specials=((-1.0, 0), (-2.0, -5))),
    ), base_points=610, version=3, scaling={"base_score": 600.0, "base_odds": 50.0, "pdo": 20.0},
        metadata={"trained_on": "2026-Q4", "rows": 120000})


def _deep_shuffled(obj: Any, rng: random.Random) -> Any:
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _deep_shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_deep_shuffled(v, rng) for v in obj]
    return obj


def test_json_and_msgpack_round_trips_score_the_same() -> None:
    card = _card()
    X = _tricky_matrix(card, 5_000, seed=3)
    want = card.explain(X, k=3)
    for copy in (Scorecard.from_json(card.to_json()),
                 Scorecard.from_msgpack(card.to_msgpack()),
                 Scorecard.from_json(Scorecard.from_msgpack(card.to_msgpack()).to_json())):
        assert copy == card
        got = copy.explain(X, k=3)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert copy.canonical_bytes() == card.canonical_bytes()
        assert copy.card_id == card.card_id


@given(cards(finite=True))
@settings(max_examples=50)
def test_random_cards_round_trip(card: Scorecard) -> None:
    for copy in (Scorecard.from_json(card.to_json()), Scorecard.from_msgpack(card.to_msgpack())):
        assert copy == card and copy.canonical_bytes() == card.canonical_bytes()


def test_canonical_bytes_are_stable_and_key_order_independent() -> None:
    card = _card()
    data = card.canonical_bytes()
    assert data == _card().canonical_bytes() == card.to_json().encode()
    assert json.loads(data) == card.as_dict()
    assert b" " not in data and data.isascii()
    rng = random.Random(7)
    for _ in range(20):
        shuffled = json.dumps(_deep_shuffled(card.as_dict(), rng), indent=rng.choice([None, 2]))
        assert Scorecard.from_json(shuffled).canonical_bytes() == data
    assert len(card.card_id) == 16 and int(card.card_id, 16) >= 0


def test_card_id_changes_when_any_point_changes() -> None:
    card = _card()
    seen = {card.card_id}
    d = card.as_dict()
    variants = [{**d, "base_points": d["base_points"] + 1}]
    for i, f in enumerate(d["features"]):
        def with_feature(i: int = i, f: dict[str, Any] = f, **changes: Any) -> dict[str, Any]:
            features = [dict(g) for g in d["features"]]
            features[i] = {**f, **changes}
            return {**d, "features": features}
        for j in range(len(f["points"])):
            points = list(f["points"])
            points[j] += 1
            variants.append(with_feature(points=points))
        variants.append(with_feature(missing_points=f["missing_points"] - 1))
        for j in range(len(f["specials"])):
            specials = [list(s) for s in f["specials"]]
            specials[j][1] += 1
            variants.append(with_feature(specials=specials))
        variants.append(with_feature(edges=[e + 0.5 for e in f["edges"]]))
    for v in variants:
        changed = Scorecard.from_dict(v)
        assert changed != card
        assert changed.card_id not in seen
        seen.add(changed.card_id)
    assert len(seen) == len(variants) + 1


def test_signed_card_round_trip_and_rejections() -> None:
    card = _card()
    issuer = IssuerKey(bytes(range(32)))
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.CREDENTIALS | Role.SCORECARD)
    document = card.sign(issuer)
    loaded = Scorecard.load_signed(document, trust)
    assert loaded == card and loaded.card_id == card.card_id

    # A key trusted for credentials only may not sign cards.
    credentials_only = TrustStore()
    credentials_only.add(issuer.public, roles=Role.CREDENTIALS)
    with pytest.raises(IssuerKeyRole, match="scorecard"):
        Scorecard.load_signed(document, credentials_only)
    # An issuer nobody trusts.
    with pytest.raises(UnknownKeyId):
        Scorecard.load_signed(document, TrustStore())
    # Another key with the same role does not make the first one's cards valid.
    other = IssuerKey(bytes(range(1, 33)))
    forged = card.sign(other)
    with pytest.raises(UnknownKeyId):
        Scorecard.load_signed(forged, trust)

    # Change one point inside the signed card: the signature no longer covers it.
    needle = b'"points":[40,30,15,0,-20]'
    assert document.count(needle) == 1
    tampered = document.replace(needle, b'"points":[40,30,15,0,-10]')
    with pytest.raises(BadSignature):
        Scorecard.load_signed(tampered, trust)
    # Any flipped byte anywhere is refused with a typed error.
    rng = random.Random(11)
    for at in rng.sample(range(len(document)), 60):
        bad = bytearray(document)
        bad[at] ^= 1 << rng.randrange(8)
        with pytest.raises(QrPayError):
            Scorecard.load_signed(bytes(bad), trust)
    for junk in (b"", b"\x90", document[:-1], document + b"\x00"):
        with pytest.raises(QrPayError):
            Scorecard.load_signed(junk, trust)


# ============================================================================
# Invalid cards and inputs
# ============================================================================

@pytest.mark.parametrize("kwargs", [
    {"edges": (2.0, 1.0)},                       # unsorted
    {"edges": (1.0, 1.0), "points": (0, 0, 0)},  # not strictly increasing
    {"edges": (1.0, math.nan)},                  # NaN edge
    {"points": (0, 0)},                          # one point short
    {"points": (0, 0, 0, 0)},                    # one point too many
    {"points": (0, 1.5, 0)},                     # not an integer
    {"points": (0, True, 0)},                    # bool is not a point value
    {"points": (0, 2_000_000, 0)},               # out of range
    {"missing_points": 0.5},
    {"specials": ((math.nan, 1),)},              # NaN special code
    {"specials": ((-1.0, 1), (-1.0, 2))},        # duplicate special code
    {"specials": ((-1.0, 1.5),)},
    {"name": ""},
    {"name": "x" * 65},
])
def test_invalid_features_are_refused(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": "f", "edges": (1.0, 2.0), "points": (0, 1, 2),
                              "missing_points": 0}
    fields.update(kwargs)
    with pytest.raises(InvalidArgument):
        FeatureBins(**fields)


def test_invalid_cards_are_refused() -> None:
    f = FeatureBins("f", (1.0,), (0, 1), 0)
    with pytest.raises(InvalidArgument):
        Scorecard((f, FeatureBins("f", (), (3,), 0)), 0)       # duplicate names
    with pytest.raises(InvalidArgument):
        Scorecard((), 0)
    with pytest.raises(InvalidArgument):
        Scorecard(tuple(FeatureBins(f"f{i}", (), (0,), 0) for i in range(65)), 0)
    with pytest.raises(InvalidArgument):
        Scorecard((f,), 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Scorecard((f,), 0, version="1")  # type: ignore[arg-type]


def test_invalid_documents_are_refused() -> None:
    card = _card()
    text = card.to_json()
    d = card.as_dict()
    bad_texts = [
        "", "{", "[]", "null", "1", text.replace('"format":1', '"format":2'),
        json.dumps({k: v for k, v in d.items() if k != "features"}),
        json.dumps({**d, "features": []}),
        json.dumps({**d, "features": [{**d["features"][0], "edges": [0.5, 0.1, 0.3, 0.8]}]}),
        json.dumps({**d, "features": [{**d["features"][0], "points": [1, 2]}]}),
        json.dumps({**d, "features": [d["features"][0], d["features"][0]]}),
        json.dumps({**d, "features": [{k: v for k, v in d["features"][0].items()
                                       if k != "missing_points"}]}),
        json.dumps({**d, "features": [{**d["features"][0], "edges": None}]}),
        json.dumps({**d, "features": [{**d["features"][0], "edges": ["a"]}]}),
        text.replace('"edges":[0.1,0.3,0.5,0.8]', '"edges":[0.1,NaN,0.5,0.8]'),
    ]
    for bad in bad_texts:
        with pytest.raises((InvalidArgument, MalformedMessage)):
            Scorecard.from_json(bad)
    for bad_bytes in (b"", b"\xc1", b"\x91\x01", card.to_msgpack()[:-1], card.to_msgpack() + b"\0"):
        with pytest.raises(MalformedMessage):
            Scorecard.from_msgpack(bad_bytes)


def test_invalid_inputs_are_refused() -> None:
    card = _card()
    n = len(card.features)
    good = np.zeros((4, n))
    for bad in (np.zeros(n), np.zeros((4, n + 1)), np.zeros((4, n - 1)), np.zeros((2, 2, n)),
                np.zeros((0,)), np.array([["a"] * n]), np.zeros((4, n), dtype=object),
                np.zeros((4, n), dtype=complex), np.zeros((4, n), dtype=bool),
                [[1.0, 2.0]], "text"):
        with pytest.raises(InvalidArgument):
            card.score(bad)
        with pytest.raises(InvalidArgument):
            card.explain(bad, k=1)
    for k in (-1, n + 1, 9, 100):
        with pytest.raises(InvalidArgument):
            card.explain(good, k=k)
    wide = Scorecard(tuple(FeatureBins(f"f{i}", (), (0,), 0) for i in range(12)), 0)
    with pytest.raises(InvalidArgument):
        wide.explain(np.zeros((1, 12)), k=9)                 # at most 8 reasons
    assert wide.explain(np.zeros((1, 12)), k=8)[1].shape == (1, 8)
    for threads in (0, -1):
        with pytest.raises(InvalidArgument):
            card.score(good, threads=threads)


# ============================================================================
# Limit policies
# ============================================================================

def _policy() -> LimitPolicy:
    return LimitPolicy((
        LimitBand(560, {Scene.BUS: 2_000, Scene.METRO: 2_000}),
        LimitBand(620, {Scene.BUS: 5_000, Scene.METRO: 5_000, Scene.CANTEEN: 3_000}),
        LimitBand(700, {Scene.BUS: 10_000, Scene.METRO: 10_000, Scene.CANTEEN: 8_000,
                        Scene.RETAIL: 20_000}),
    ))


def test_limits_per_band_and_scene() -> None:
    policy = _policy()
    scores = np.array([0, 559, 560, 619, 620, 699, 700, 10_000, -5])
    limits = policy.limits(scores)
    assert set(limits) == set(Scene)
    assert limits[Scene.BUS].tolist() == [0, 0, 2_000, 2_000, 5_000, 5_000, 10_000, 10_000, 0]
    assert limits[Scene.CANTEEN].tolist() == [0, 0, 0, 0, 3_000, 3_000, 8_000, 8_000, 0]
    assert limits[Scene.RETAIL].tolist() == [0] * 6 + [20_000] * 2 + [0]
    assert limits[Scene.FERRY].tolist() == [0] * 9
    assert all(v.dtype == np.int64 for v in limits.values())


def test_terms() -> None:
    policy = _policy()
    assert policy.terms(559) == (0, frozenset())
    assert policy.terms(560) == (2_000, frozenset({Scene.BUS, Scene.METRO}))
    assert policy.terms(650) == (5_000, frozenset({Scene.BUS, Scene.METRO, Scene.CANTEEN}))
    assert policy.terms(700) == (20_000, frozenset({Scene.BUS, Scene.METRO, Scene.CANTEEN,
                                                    Scene.RETAIL}))
    # A band whose limits are all zero gives no credit.
    closed = LimitPolicy((LimitBand(0, {Scene.BUS: 0}), LimitBand(600, {Scene.BUS: 100})))
    assert closed.terms(599) == (0, frozenset())


def test_issue_a_credential_from_a_policy() -> None:
    from qrpay import DeviceKey
    policy = _policy()
    issuer = IssuerKey(bytes(range(32)))
    device = DeviceKey(bytes(range(32, 64)))
    trust = TrustStore()
    trust.add(issuer.public)
    card = _card()
    X = np.array([[0.05, 48.0, 0.0], [0.9, 3.0, 2.0], [np.nan, 24.0, -1.0]])
    scores = card.score(X)
    assert scores.tolist() == [610 + 40 + 25 + 30, 610 - 20 - 15 - 40, 610 + 5 + 10 + 0]
    issued = [policy.issue(issuer, 7 + i, device.public, int(s), NOW, NOW + 86_400)
              for i, s in enumerate(scores)]
    top, cut_off, middle = issued
    assert cut_off is None
    assert isinstance(top, Credential) and isinstance(middle, Credential)
    assert top.limit == 20_000 and top.scenes == {Scene.BUS, Scene.METRO, Scene.CANTEEN,
                                                   Scene.RETAIL}
    assert middle.limit == 5_000 and middle.scenes == {Scene.BUS, Scene.METRO, Scene.CANTEEN}
    assert (top.account, top.not_before, top.not_after) == (7, NOW, NOW + 86_400)
    assert top.device_key == device.public.to_bytes()
    trust.verify_credential(top, NOW)


def test_policy_round_trip_and_validation() -> None:
    policy = _policy()
    assert LimitPolicy.from_dict(json.loads(json.dumps(policy.as_dict()))) == policy
    with pytest.raises(InvalidArgument):
        LimitPolicy(())
    with pytest.raises(InvalidArgument):
        LimitPolicy((LimitBand(600, {}), LimitBand(600, {})))
    with pytest.raises(InvalidArgument):
        LimitPolicy((LimitBand(600, {}), LimitBand(500, {})))
    for bad_limit in (-1, 2**32):
        with pytest.raises(InvalidArgument):
            LimitPolicy((LimitBand(600, {Scene.BUS: bad_limit}),))
    for bad in ({}, {"bands": [{"min_score": 1}]},
                {"bands": [{"min_score": 1, "limits": {"rocket": 5}}]},
                {"bands": [{"min_score": "x", "limits": {}}]}):
        with pytest.raises(MalformedMessage):
            LimitPolicy.from_dict(bad)


# ============================================================================
# Drift and ranking
# ============================================================================

def test_psi() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(0, 1, 50_000)
    assert psi(base, base) == pytest.approx(0.0, abs=1e-12)
    assert psi(base, rng.normal(0, 1, 50_000)) < 0.01          # same population
    assert psi(base, base + 0.5) > 0.1                         # shifted
    assert psi(base, base * 2) > 0.1                           # spread
    # NaN is a bin of its own: the same share of NaN is no drift, a new share is.
    with_nan = base.copy()
    with_nan[::10] = np.nan
    assert psi(with_nan, with_nan) == pytest.approx(0.0, abs=1e-12)
    assert psi(base, with_nan) > 0.1
    assert math.isfinite(psi(np.full(100, np.nan), base))
    assert psi([1.0, 1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InvalidArgument):
        psi([], [1.0])
    with pytest.raises(InvalidArgument):
        psi([1.0], [1.0], bins=0)


def test_feature_psi() -> None:
    card = _card()
    X = _tricky_matrix(card, 50_000, seed=9)
    drift = feature_psi(card, X, X)
    assert list(drift) == list(card.feature_names)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in drift.values())
    Y = X.copy()
    Y[:, 1] = np.where(np.isnan(Y[:, 1]), 0.0, Y[:, 1] + 20.0)   # months_on_book moves up
    Y[:10_000, 2] = -2.0                                        # late_90d: a special code floods in
    drift = feature_psi(card, X, Y)
    assert drift["utilisation"] == pytest.approx(0.0, abs=1e-12)
    assert drift["months_on_book"] > 0.1 and drift["late_90d"] > 0.1
    X32 = X.astype(np.float32)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in feature_psi(card, X32, X32).values())
    with pytest.raises(InvalidArgument):
        feature_psi(card, X[:, :2], X)


def _brute_auc(scores: list[float], bad: list[int]) -> float:
    wins = 0.0
    goods = [s for s, b in zip(scores, bad, strict=True) if not b]
    bads = [s for s, b in zip(scores, bad, strict=True) if b]
    for g in goods:
        for b in bads:
            wins += 1.0 if g > b else 0.5 if g == b else 0.0
    return wins / (len(goods) * len(bads))


@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=2, max_size=60)
       .filter(lambda rows: 0 < sum(b for _, b in rows) < len(rows)))
def test_auc_matches_a_pairwise_count(rows: list[tuple[int, bool]]) -> None:
    scores = [float(s) for s, _ in rows]
    bad = [int(b) for _, b in rows]
    assert auc(scores, bad) == pytest.approx(_brute_auc(scores, bad), abs=1e-12)


def test_auc() -> None:
    assert auc([3, 2, 1], [0, 0, 1]) == 1.0
    assert auc([1, 2, 3], [0, 0, 1]) == 0.0
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    rng = np.random.default_rng(2)
    s = rng.normal(size=300)
    y = (rng.random(300) < 0.3).astype(int)
    assert auc(s, y) == pytest.approx(_brute_auc(s.tolist(), y.tolist()), abs=1e-12)
    for bad in ([0, 0, 0], [1, 1, 1]):
        with pytest.raises(InvalidArgument):
            auc([1, 2, 3], bad)
