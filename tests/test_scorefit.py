"""Fitting a scorecard (scorefit.py) on synthetic histories with a known truth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qrpay import scorefit, synthetic
from qrpay.errors import InvalidArgument
from qrpay.scoring import Scorecard, auc
from qrpay.synthetic import CLEAR, TRUTH, histories

SPECIAL = (-1.0,)


@pytest.fixture(scope="module")
def data() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], tuple[str, ...]]:
    return histories(200_000, seed=11)


@pytest.fixture(scope="module")
def fitted(data: tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], tuple[str, ...]]
           ) -> scorefit.FitResult:
    X, y, _ = data
    return scorefit.fit(X, y, special_codes=SPECIAL)


def card_of(result: scorefit.FitResult, names: tuple[str, ...]) -> Scorecard:
    return Scorecard.from_fit(result, names)


def is_monotonic(rates: tuple[float, ...], trend: str) -> bool:
    steps = np.diff(rates)
    return bool(np.all(steps > 0) if trend == "increasing" else np.all(steps < 0))


def woe_of(bad: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_]) -> float:
    """Unsmoothed WOE of the rows in mask: close to the fit's on big bins."""
    goods, bads = np.count_nonzero(mask & ~bad), np.count_nonzero(mask & bad)
    return math.log((goods / np.count_nonzero(~bad)) / (bads / np.count_nonzero(bad)))


# -- on synthetic histories -------------------------------------------------------------------

def test_synthetic_histories_are_deterministic_and_plausible() -> None:
    X, y, names = histories(5_000, seed=4)
    X2, y2, _ = histories(5_000, seed=4)
    assert np.array_equal(X, X2, equal_nan=True) and np.array_equal(y, y2)
    assert X.shape == (5_000, 12) and X.dtype == np.float64 and y.dtype == np.bool_
    assert set(names) == set(TRUTH) and set(CLEAR) <= set(TRUTH)
    assert set(TRUTH.values()) == {"increasing", "decreasing"}
    assert 0.05 <= y.mean() <= 0.15
    assert not np.array_equal(histories(5_000, seed=5)[0], X, equal_nan=True)
    assert np.isfinite(synthetic.true_log_odds(X)).all()


def test_bad_rate_is_monotonic_in_every_fitted_trend(fitted: scorefit.FitResult) -> None:
    for f in fitted.features:
        assert f.trend in ("increasing", "decreasing")
        assert len(f.bad_rate) == len(f.edges) + 1 == len(f.numeric_points)
        assert is_monotonic(f.bad_rate, f.trend), f
        # Points fall as risk rises (a coefficient could flip this; none does here).
        steps = np.diff(f.numeric_points)
        assert np.all(steps <= 0) if f.trend == "increasing" else np.all(steps >= 0)


def test_auto_trend_finds_the_ground_truth(fitted: scorefit.FitResult,
                                           data: tuple[Any, Any, tuple[str, ...]]) -> None:
    names = data[2]
    found = {name: f.trend for name, f in zip(names, fitted.features)}
    for name in CLEAR:
        assert found[name] == TRUTH[name], name


def test_bins_respect_max_bins_and_min_share(fitted: scorefit.FitResult,
                                             data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X = data[0]
    for column, f in zip(X.T, fitted.features):
        numeric = column[~np.isnan(column) & (column != -1.0)]
        counts = np.bincount(np.searchsorted(f.edges, numeric, side="right"),
                             minlength=len(f.edges) + 1)
        assert len(counts) <= 6
        assert counts.min() >= 0.05 * len(numeric)


def test_bad_rates_match_the_data(fitted: scorefit.FitResult,
                                  data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X, y, _ = data
    for column, f in zip(X.T, fitted.features):
        numeric = ~np.isnan(column) & (column != -1.0)
        index = np.searchsorted(f.edges, column[numeric], side="right")
        rates = np.bincount(index, weights=y[numeric]) / np.bincount(index)
        assert np.allclose(rates, f.bad_rate)


def test_requested_trends_are_honoured(data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X, y, names = data
    X, y = X[:50_000], y[:50_000]
    # Every feature against its truth: the monotonic binning must still hold.
    against = ["increasing" if TRUTH[n] == "decreasing" else "decreasing" for n in names]
    result = scorefit.fit(X, y, trend=against, special_codes=SPECIAL)
    for f, want in zip(result.features, against):
        assert f.trend == want
        assert is_monotonic(f.bad_rate, want)
    # Forced against a clear truth, pooling leaves (almost) nothing to say.
    on_time = result.features[names.index("on_time_ratio")]
    assert len(on_time.edges) <= 1
    one = scorefit.fit(X, y, trend="increasing", special_codes=SPECIAL)
    assert all(f.trend == "increasing" for f in one.features)


def test_missing_and_special_values_get_their_own_bins(
        fitted: scorefit.FitResult, data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X, y, names = data
    on_time = names.index("on_time_ratio")
    dpd = names.index("max_days_past_due")
    income = names.index("income_band")
    # New accounts (NaN) and never-borrowed (-1) are riskier than average in the truth.
    for f, mask in ((on_time, np.isnan(X[:, on_time])), (dpd, X[:, dpd] == -1.0),
                    (income, X[:, income] == -1.0)):
        fit = fitted.features[f]
        k = len(fit.edges) + 1
        woe = fit.woe[k] if f == on_time else fit.woe[k + 1]
        assert woe < -0.05
        assert woe == pytest.approx(woe_of(y, mask), abs=0.01)
        points = fit.missing_points if f == on_time else fit.special_points[0][1]
        assert points < 0
    # No NaN and no -1 in these columns: neutral bins, WOE 0 and 0 points.
    social = fitted.features[names.index("social_insurance_months")]
    k = len(social.edges) + 1
    assert social.woe[k:] == (0.0, 0.0)
    assert social.missing_points == 0 and social.special_points == ((-1.0, 0),)
    # -1 is never a numeric edge where it is special: it never enters the numeric bins.
    assert all(e != -1.0 for f in fitted.features for e in f.edges)


def test_per_feature_special_codes(data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X, y, names = data
    X, y = X[:20_000], y[:20_000]
    dpd = names.index("max_days_past_due")
    result = scorefit.fit(X, y, special_codes={dpd: [-1.0, 180.0, -1.0]})
    assert [c for c, _ in result.features[dpd].special_points] == [-1.0, 180.0]
    assert all(f.special_points == () for i, f in enumerate(result.features) if i != dpd)
    # income_band's -1 is now an ordinary value: the lowest numeric bin.
    income = result.features[names.index("income_band")]
    assert len(income.woe) == len(income.edges) + 2


def test_card_ranks_held_out_accounts(fitted: scorefit.FitResult,
                                      data: tuple[Any, Any, tuple[str, ...]]) -> None:
    card = card_of(fitted, data[2])
    X, y, _ = histories(100_000, seed=12)
    scores = card.score(X)
    area = auc(scores, y)
    print(f"held-out AUC {area:.4f}")
    assert area > 0.75
    # The points are the model's logit, rescaled and rounded.
    factor = fitted.scaling["pdo"] / math.log(2)
    offset = fitted.scaling["base_score"] - factor * math.log(fitted.scaling["base_odds"])
    assert fitted.base_points == round(offset - factor * fitted.intercept)
    assert all(c < 0 for c in (fitted.coefficients[data[2].index(n)] for n in CLEAR
                                if n != "late_payments_12m"))


def test_points_follow_the_scaling() -> None:
    X, y, _ = histories(20_000, seed=3)
    a = scorefit.fit(X, y, special_codes=SPECIAL)
    b = scorefit.fit(X, y, special_codes=SPECIAL, base_score=700, pdo=40)
    # base = base_score - factor * (ln base_odds + b0); doubling pdo doubles factor.
    assert b.base_points - 700 == pytest.approx(2 * (a.base_points - 600), abs=2)
    for fa, fb in zip(a.features, b.features):
        assert all(abs(pb - 2 * pa) <= 1 for pa, pb in zip(fa.numeric_points, fb.numeric_points))


def test_stronger_l2_shrinks_the_coefficients() -> None:
    X, y, _ = histories(5_000, seed=3)
    loose = scorefit.fit(X, y, special_codes=SPECIAL, l2=0.0)
    tight = scorefit.fit(X, y, special_codes=SPECIAL, l2=1e5)
    assert np.linalg.norm(tight.coefficients) < 0.2 * np.linalg.norm(loose.coefficients)


def test_fit_through_the_scorecard(data: tuple[Any, Any, tuple[str, ...]]) -> None:
    X, y, names = data
    card = Scorecard.fit(X[:20_000], y[:20_000].astype(np.int8), names)
    assert card.feature_names == names
    assert Scorecard.from_json(card.to_json()) == card


# -- bad input ---------------------------------------------------------------------------------

GOOD_X = np.arange(40, dtype=np.float64).reshape(20, 2)
GOOD_Y = np.array([0, 1] * 10)


@pytest.mark.parametrize("X, y", [
    (GOOD_X[:, 0], GOOD_Y),                         # one-dimensional X
    (GOOD_X, GOOD_Y[:-1]),                          # one label short
    (GOOD_X, GOOD_Y.reshape(10, 2)),
    (GOOD_X[:5], GOOD_Y[:5]),                       # too few rows
    (GOOD_X, GOOD_Y * 2),                           # labels not 0/1
    (GOOD_X, np.where(GOOD_Y == 1, np.nan, 0.0)),
    (GOOD_X, np.zeros(20)),                         # one class
    (GOOD_X, np.ones(20, dtype=bool)),
    (GOOD_X.astype(str), GOOD_Y),
    (np.zeros((20, 0)), GOOD_Y),
    ([[1.0, 2.0], [3.0]], [0, 1]),
])
def test_bad_data_is_refused(X: Any, y: Any) -> None:
    with pytest.raises(InvalidArgument):
        scorefit.fit(X, y)


@pytest.mark.parametrize("kwargs", [
    {"trend": "up"}, {"trend": ["increasing"]}, {"trend": ["auto", "sideways"]},
    {"special_codes": [math.nan]}, {"special_codes": [math.inf]}, {"special_codes": ["x"]},
    {"special_codes": 3.0}, {"special_codes": {2: [-1.0]}}, {"special_codes": {0: [math.nan]}},
    {"max_bins": 0}, {"max_bins": 2.5}, {"min_bin_share": -0.1}, {"min_bin_share": 1.5},
    {"l2": -1.0}, {"l2": math.nan}, {"pdo": 0.0}, {"base_odds": -1.0}, {"base_score": math.inf},
])
def test_bad_options_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        scorefit.fit(GOOD_X, GOOD_Y, **kwargs)


def test_a_separable_sample_without_l2_still_gives_a_card_that_separates() -> None:
    # No regularisation on perfectly separable data: the weights would run off
    # to infinity; the fit stops with bounded points that still rank perfectly.
    y = (GOOD_X[:, 0] >= 20).astype(int)
    result = scorefit.fit(GOOD_X, y, l2=0.0, min_bin_share=0.0)
    assert auc(card_of(result, ("a", "b")).score(GOOD_X), y) == 1.0


values = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([-1.0, 0.0, 1.0, 2.0, math.nan]))


@st.composite
def small_problems(draw: st.DrawFn) -> tuple[Any, Any, dict[str, Any]]:
    # Mostly shapes that pass the checks, so the fit itself gets exercised.
    n = draw(st.one_of(st.integers(10, 40), st.integers(0, 12)))
    f = draw(st.one_of(st.integers(1, 3), st.just(0)))
    X = np.array(draw(st.lists(values, min_size=n * f, max_size=n * f)),
                 dtype=np.float64).reshape(n, f)
    y = np.array(draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)),
                 dtype=np.int64)
    kwargs = draw(st.fixed_dictionaries({}, optional={
        "trend": st.one_of(st.sampled_from(["auto", "increasing", "decreasing", "bad"]),
                           st.lists(st.sampled_from(["auto", "increasing", "decreasing"]),
                                    max_size=4)),
        "special_codes": st.one_of(
            st.lists(st.floats(allow_nan=True), max_size=3),
            st.dictionaries(st.integers(-1, 4), st.lists(st.floats(-5, 5), max_size=2))),
        "max_bins": st.integers(-1, 8),
        "min_bin_share": st.floats(-0.5, 1.5),
        "l2": st.floats(-1.0, 1e6),
        "pdo": st.floats(-10, 100),
    }))
    return X, y, kwargs


@settings(max_examples=300)
@given(small_problems())
def test_fit_raises_only_invalid_argument(problem: tuple[Any, Any, dict[str, Any]]) -> None:
    X, y, kwargs = problem
    try:
        result = scorefit.fit(X, y, **kwargs)
    except InvalidArgument:
        return
    # Whatever it returns must make a valid card.
    names = tuple(f"f{i}" for i in range(X.shape[1]))
    card = card_of(result, names)
    # (card_of already refused non-finite edges, WOE and IV: FeatureBins checks them.)
    for f in result.features:
        assert len(f.woe) == len(f.edges) + 2 + len(f.special_points)
        assert is_monotonic(f.bad_rate, f.trend)
    assert card.score(X).shape == (X.shape[0],)


@pytest.mark.parametrize("X", [np.array([["1", "2"]] * 20), [[1.0, 2.0], [3.0]] * 10])
def test_scorecard_fit_refuses_what_scorefit_refuses(X: Any) -> None:
    # Strings and ragged rows are InvalidArgument, not a numpy error (nor, for
    # numeric strings, quietly converted).
    with pytest.raises(InvalidArgument):
        Scorecard.fit(X, GOOD_Y, ("a", "b"))


def test_a_feature_missing_in_every_row_is_refused() -> None:
    # It was fitted as one all-missing bin worth 0 points, silently (issue 11).
    X, bad, names = histories(600, seed=5)
    X[:, 2] = np.nan
    with pytest.raises(InvalidArgument, match="feature 2 .* missing .* in every row"):
        scorefit.fit(X, bad)
    with pytest.raises(InvalidArgument, match="feature 2"):
        Scorecard.fit(X, bad, names)
    X[0, 2] = 1.0                  # one value is something to fit (a special code too)
    assert len(Scorecard.fit(X, bad, names).features) == len(names)
