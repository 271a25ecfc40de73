"""Categorical scorecards (issue 16): 1,000,000 rows x (8 numeric + 6
categorical features: missing, unseen and rare categories) scored

- from a pandas DataFrame whose categorical columns have the category dtype
  (labels matched to codes once per distinct label),
- from the codes as a float array (what the compiled core reads),

against the plain pandas/numpy reference of tests/test_categorical_card.py
(target: at least 15x), and against Scorecard.score on 14 numeric features
of the same shape given the same way, a DataFrame against a DataFrame and a
float array against a float array (target: at most 1.5x). Every timed call checks its scores
against the reference on all rows. Scorecard.fit on 40,000 synthetic
categorical histories is timed with its held-out AUC beside it (and
optbinning's on the same data when the bench extra is installed).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from qrpay.scoring import FeatureBins, Scorecard, auc
from qrpay.synthetic_categories import categorical_histories

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_categorical_card import CARD, city, numeric, reference  # noqa: E402

ROWS = 1_000_000
MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def rows() -> dict[str, Any]:
    frame = city(ROWS, seed=16)
    for name in frame.columns:   # the categorical columns as pandas' category dtype
        if name.startswith("k") and not isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = pd.Categorical(frame[name].astype(object).where(
                frame[name].notna() & (frame[name] != ""), None))
    expected = reference(CARD, frame)
    # 14 numeric features of the same kind: the 8 numeric and 6 more like them.
    numbers = Scorecard(tuple(numeric(i) for i in range(14)), base_points=500)
    rng = np.random.default_rng(17)
    X = np.column_stack([rng.normal(10 * i + 30, 30, ROWS) for i in range(14)])
    X[rng.random(X.shape) < 0.05] = np.nan
    return {"frame": frame, "codes": CARD.matrix(frame), "expected": expected,
            "numbers": numbers, "X": X, "numbers_expected": numbers.score(X),
            "numbers_frame": pd.DataFrame(X, columns=list(numbers.feature_names))}


def _timed(name: str, benchmark: Any, call: Any) -> Any:
    result = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    MEDIANS[name] = benchmark.stats.stats.median
    return result


def test_reference(benchmark: Any, rows: dict[str, Any]) -> None:
    got = _timed("reference", benchmark, lambda: reference(CARD, rows["frame"]))
    assert np.array_equal(got, rows["expected"])


def test_score_from_a_frame(benchmark: Any, rows: dict[str, Any]) -> None:
    got = _timed("frame", benchmark, lambda: CARD.score(rows["frame"]))
    assert np.array_equal(got, rows["expected"])


def test_score_from_codes(benchmark: Any, rows: dict[str, Any]) -> None:
    got = _timed("codes", benchmark, lambda: CARD.score(rows["codes"]))
    assert np.array_equal(got, rows["expected"])


def test_score_of_14_numeric_features(benchmark: Any, rows: dict[str, Any]) -> None:
    got = _timed("numeric", benchmark, lambda: rows["numbers"].score(rows["X"]))
    assert np.array_equal(got, rows["numbers_expected"])


def test_score_of_14_numeric_features_from_a_frame(benchmark: Any,
                                                   rows: dict[str, Any]) -> None:
    got = _timed("numeric_frame", benchmark,
                 lambda: rows["numbers"].score(rows["numbers_frame"]))
    assert np.array_equal(got, rows["numbers_expected"])


def test_fit_on_categorical_histories(benchmark: Any) -> None:
    train, test = categorical_histories(40_000, seed=1), categorical_histories(40_000, seed=2)
    frame = train.to_frame()
    start = time.perf_counter()
    card = benchmark.pedantic(lambda: Scorecard.fit(frame, train.y, list(frame.columns)),
                              rounds=1, iterations=1)
    MEDIANS["fit"] = time.perf_counter() - start
    MEDIANS["fit_auc"] = auc(card.score(test.to_frame()), test.y)
    assert MEDIANS["fit_auc"] > 0.75
    if importlib.util.find_spec("optbinning") is None:
        return
    from optbinning import BinningProcess, Scorecard as OptScorecard   # bench extra
    from sklearn.linear_model import LogisticRegression
    names = list(frame.columns)
    categorical = [n for n in names if isinstance(frame[n].dtype, pd.CategoricalDtype)]
    start = time.perf_counter()
    theirs = OptScorecard(binning_process=BinningProcess(names, categorical_variables=categorical),
                          estimator=LogisticRegression(max_iter=1000))
    theirs.fit(frame.astype({n: object for n in categorical}), train.y.astype(int))
    MEDIANS["fit_optbinning"] = time.perf_counter() - start
    their_scores = -theirs.score(test.to_frame().astype({n: object for n in categorical}))
    MEDIANS["fit_auc_optbinning"] = auc(their_scores, test.y)


def summary_lines() -> list[str]:
    m = MEDIANS
    lines = ["", f"---- categorical scorecards: {ROWS:,} rows x (8 numeric + 6 categorical), "
                 "medians of 5"]
    for key, what in (("reference", "pandas/numpy reference"),
                      ("frame", "Scorecard.score from a DataFrame (category dtype)"),
                      ("codes", "Scorecard.score from codes (float array)"),
                      ("numeric", "Scorecard.score, 14 numeric features (float array)"),
                      ("numeric_frame", "Scorecard.score, 14 numeric features (DataFrame)")):
        if key in m:
            lines.append(f"  {what:<52} {m[key] * 1000:9.1f} ms")
    checks = []
    if {"reference", "frame"} <= m.keys():
        checks.append(("score from a DataFrame vs the reference", m["reference"] / m["frame"],
                       15.0, False))
    if {"frame", "numeric_frame"} <= m.keys():
        checks.append(("DataFrame: 8+6 vs 14 numeric (time)", m["frame"] / m["numeric_frame"],
                       1.5, True))
    if {"codes", "numeric"} <= m.keys():
        checks.append(("float array: codes vs 14 numeric (time)", m["codes"] / m["numeric"],
                       1.5, True))
    for name, ratio, limit, at_most in checks:
        ok = ratio <= limit if at_most else ratio >= limit
        lines.append(f"  {'PASS' if ok else 'MISS'}   {name:<46} {ratio:6.2f} "
                     f"(target {'<=' if at_most else '>='} {limit})")
    if "fit" in m:
        lines.append(f"  fit on 40,000 categorical histories: {m['fit']:.2f} s, held-out AUC "
                     f"{m['fit_auc']:.4f}")
    if "fit_optbinning" in m:
        lines.append(f"  optbinning on the same: {m['fit_optbinning']:.2f} s, AUC "
                     f"{m['fit_auc_optbinning']:.4f}")
        gap = m["fit_auc"] - m["fit_auc_optbinning"]
        share = m["fit"] / m["fit_optbinning"]
        lines.append(f"  {'PASS' if abs(gap) <= 0.01 or gap > 0 else 'MISS'}   "
                     f"{'held-out AUC, ours - optbinning':<46} {gap:+6.4f} (target >= -0.01)")
        lines.append(f"  {'PASS' if share <= 0.5 else 'MISS'}   "
                     f"{'fit time, ours / optbinning':<46} {share:6.2f} (target <= 0.5)")
    else:
        lines.append("  optbinning not installed (pip install '.[test,bench]'): its fit not run")
    lines.append("  (a MISS does not fail the run: timings on a shared machine are noisy)")
    return lines


@pytest.fixture(scope="module", autouse=True)
def closing_lines(request: pytest.FixtureRequest, write_at_end: Any) -> Iterator[None]:
    MEDIANS.clear()
    yield
    write_at_end(request, summary_lines())
