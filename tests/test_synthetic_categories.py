"""qrpay.synthetic_categories: categorical credit features whose true effect on
the log-odds of default is published, checked against what a large sample shows.

Statistical tolerances are 4 standard errors (two-sided false alarm ~6e-5 per
comparison) and the data are drawn from a fixed seed, so these tests are
deterministic; the checks still fail if the published table and the drawing
disagree (a wrong sign, a swapped category, a dropped contribution)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from qrpay import synthetic
from qrpay.errors import InvalidArgument
from qrpay.synthetic_categories import (
    CATEGORICAL_FEATURES, CATEGORIES, EFFECTS, MISSING_EFFECT, MISSING_SHARE, NO_EFFECT,
    RARE, SHARES, CategoricalHistories, categorical_histories, true_log_odds_categorical,
)

N_LARGE = 200_000
Z = 4.0  # standard errors allowed for a sampling difference


@pytest.fixture(scope="module")
def large() -> CategoricalHistories:
    return categorical_histories(N_LARGE, seed=0)


def _mask(values: npt.NDArray[np.object_], category: str | None) -> npt.NDArray[np.bool_]:
    if category is None:
        return np.asarray(values == None)  # noqa: E711 - elementwise on object arrays
    return np.asarray(values == category)


def _levels(feature: str) -> list[tuple[str | None, float]]:
    """Every category and missing (None) with its published contribution."""
    return [*EFFECTS[feature].items(), (None, MISSING_EFFECT[feature])]


def _empirical_log_odds(y: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_]
                        ) -> tuple[float, float]:
    """Log of the empirical odds of default in the masked rows and its standard
    error (delta method: sqrt(1/bad + 1/good))."""
    bad = int(y[mask].sum())
    good = int(mask.sum()) - bad
    assert bad > 0 and good > 0
    return math.log(bad / good), math.sqrt(1.0 / bad + 1.0 / good)


# ---------------------------------------------------------------- shape, seed, arguments

def test_same_seed_same_data_and_different_seeds_differ() -> None:
    a, b, c = (categorical_histories(5_000, 7), categorical_histories(5_000, 7),
               categorical_histories(5_000, 8))
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    for f in CATEGORICAL_FEATURES:
        assert a.categorical[f].tolist() == b.categorical[f].tolist()
        assert a.categorical[f].tolist() != c.categorical[f].tolist()
    assert not np.array_equal(a.y, c.y)


def test_numeric_features_are_exactly_those_of_synthetic_histories() -> None:
    h = categorical_histories(3_000, 5)
    X, _y, names = synthetic.histories(3_000, 5)
    np.testing.assert_array_equal(h.X, X)  # NaN compare equal here
    assert h.numeric_features == names == synthetic.FEATURES


def test_shapes_and_dtypes() -> None:
    h = categorical_histories(1_234, 3)
    assert len(h) == 1_234
    assert h.X.shape == (1_234, len(synthetic.FEATURES)) and h.X.dtype == np.float64
    assert h.y.shape == (1_234,) and h.y.dtype == np.bool_
    assert h.categorical_features == CATEGORICAL_FEATURES
    assert list(h.categorical) == list(CATEGORICAL_FEATURES)
    assert len(CATEGORICAL_FEATURES) == 6
    for f, values in h.categorical.items():
        assert values.shape == (1_234,) and values.dtype == np.object_
        assert {type(v) for v in values} <= {str, type(None)}
        assert {v for v in values if v is not None} <= set(CATEGORIES[f])
    empty = categorical_histories(0)
    assert empty.X.shape == (0, 12) and empty.y.shape == (0,)
    assert all(v.shape == (0,) for v in empty.categorical.values())
    assert empty.log_odds().shape == (0,)


@pytest.mark.parametrize("n, seed", [(-1, 0), (2.5, 0), (True, 0), ("10", 0),
                                     (10, -1), (10, 1.5), (10, False), (10, "0")])
def test_invalid_arguments(n: object, seed: object) -> None:
    with pytest.raises(InvalidArgument):
        categorical_histories(n, seed)  # type: ignore[arg-type]


def test_numpy_integers_are_accepted() -> None:
    h = categorical_histories(np.int64(100), np.int32(4))  # type: ignore[arg-type]
    np.testing.assert_array_equal(h.y, categorical_histories(100, 4).y)


# ---------------------------------------------------------------- published table

def test_published_table_has_shared_effects_a_rare_category_and_a_null_feature() -> None:
    assert NO_EFFECT == ("district",)
    for f in CATEGORICAL_FEATURES:
        assert set(EFFECTS[f]) == set(CATEGORIES[f]) == set(SHARES[f])
        assert SHARES[f][RARE[f]] < 0.01
        assert 0.0 < MISSING_SHARE[f] < 0.1
        if f not in NO_EFFECT:
            effects = list(EFFECTS[f].values())
            # some categories share an effect (a good binning groups them) ...
            assert len(set(effects)) < len(effects), f
            # ... and the feature still separates risk
            assert max(effects) - min(effects) >= 0.5, f


def test_missing_and_rare_categories_present_at_their_stated_shares(
        large: CategoricalHistories) -> None:
    for f in CATEGORICAL_FEATURES:
        values = large.categorical[f]
        for category, share in [*SHARES[f].items(), (None, MISSING_SHARE[f])]:
            seen = _mask(values, category).mean()
            se = math.sqrt(share * (1 - share) / N_LARGE)
            assert abs(seen - share) <= Z * se, (f, category, seen, share)
        rare = _mask(values, RARE[f]).mean()
        assert 0 < rare < 0.01, (f, rare)
        assert _mask(values, None).any(), f


# ---------------------------------------------------------------- the truth function

def test_true_log_odds_categorical_matches_a_plain_lookup() -> None:
    h = categorical_histories(2_000, 11)
    expect = np.array([
        sum(MISSING_EFFECT[f] if h.categorical[f][i] is None
            else EFFECTS[f][h.categorical[f][i]] for f in CATEGORICAL_FEATURES)
        for i in range(2_000)])
    got = true_log_odds_categorical(h.categorical)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h.log_odds(), synthetic.true_log_odds(h.X) + expect,
                               rtol=0, atol=1e-12)
    # lists and NaN for missing (what pandas gives back) are accepted too
    as_lists = {f: [np.nan if v is None else v for v in h.categorical[f]]
                for f in CATEGORICAL_FEATURES}
    np.testing.assert_allclose(true_log_odds_categorical(as_lists), expect, atol=1e-12)


def test_true_log_odds_categorical_rejects_what_has_no_truth() -> None:
    h = categorical_histories(50, 1)
    cats = dict(h.categorical)
    with pytest.raises(InvalidArgument, match="district"):
        true_log_odds_categorical({f: v for f, v in cats.items() if f != "district"})
    unknown = cats["housing"].copy()
    unknown[3] = "castle"
    with pytest.raises(InvalidArgument, match="castle"):
        true_log_odds_categorical({**cats, "housing": unknown})
    with pytest.raises(InvalidArgument, match="same length"):
        true_log_odds_categorical({**cats, "purpose": cats["purpose"][:-1]})


# ---------------------------------------------------------------- the label follows the truth

def test_overall_bad_rate_is_realistic(large: CategoricalHistories) -> None:
    assert 0.05 <= large.y.mean() <= 0.20
    for seed in (1, 2):
        assert 0.05 <= categorical_histories(50_000, seed).y.mean() <= 0.20


def test_empirical_log_odds_rank_like_the_published_effects(
        large: CategoricalHistories) -> None:
    """Categories are drawn independently of everything else, so a category's
    marginal odds of default is a monotone function of its contribution (the
    numeric part averages out the same way in every category). Checked for
    every pair with different effects among levels holding >= 2% of rows:
    there each log-odds has SE <= 0.04 and the smallest published gap, 0.25,
    shrinks to ~0.19 in the marginal, > 3.5 SE of the difference. Rare levels
    are checked against their value in the held-out-numeric test below."""
    checked = 0
    for f in CATEGORICAL_FEATURES:
        values = large.categorical[f]
        common = [(c, e) for c, e in _levels(f) if _mask(values, c).mean() >= 0.02]
        emp = {c: _empirical_log_odds(large.y, _mask(values, c))[0] for c, _ in common}
        for i, (ca, ea) in enumerate(common):
            for cb, eb in common[i + 1:]:
                if ea != eb:
                    assert (emp[ca] < emp[cb]) == (ea < eb), (f, ca, cb, emp[ca], emp[cb])
                    checked += 1
    assert checked >= 60


def test_categories_with_equal_effect_have_equal_empirical_log_odds(
        large: CategoricalHistories) -> None:
    """Equal contribution + independence => the same expected bad rate, so the
    difference of empirical log-odds is sampling noise only: within 4 SE of the
    difference (rare levels and missing included; their SE is wider)."""
    checked = 0
    for f in CATEGORICAL_FEATURES:
        values = large.categorical[f]
        levels = _levels(f)
        for i, (ca, ea) in enumerate(levels):
            for cb, eb in levels[i + 1:]:
                if ea == eb:
                    la, sa = _empirical_log_odds(large.y, _mask(values, ca))
                    lb, sb = _empirical_log_odds(large.y, _mask(values, cb))
                    assert abs(la - lb) <= Z * math.hypot(sa, sb), (f, ca, cb, la, lb)
                    checked += 1
    assert checked >= 30


def _offset_mle(y: npt.NDArray[np.bool_], offset: npt.NDArray[np.float64]
                ) -> tuple[float, float]:
    """Maximum-likelihood b in P(bad) = sigmoid(offset + b) (Newton), and its SE."""
    b = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(offset + b)))
        info = float((p * (1 - p)).sum())
        step = float((y - p).sum()) / info
        b += step
        if abs(step) < 1e-10:
            break
    return b, 1.0 / math.sqrt(info)


def test_each_levels_contribution_is_recovered_with_the_rest_held_out(
        large: CategoricalHistories) -> None:
    """With the numeric truth and the other five features' contributions as a
    fixed offset, the per-level maximum-likelihood contribution must equal the
    published one within 4 SE: this checks values, not just order, for every
    level including rare ones, missing and the no-effect feature."""
    base = synthetic.true_log_odds(large.X)
    parts = {f: np.array([MISSING_EFFECT[f] if v is None else EFFECTS[f][v]
                          for v in large.categorical[f]]) for f in CATEGORICAL_FEATURES}
    total = base + sum(parts.values())
    np.testing.assert_allclose(total, large.log_odds(), atol=1e-9)
    for f in CATEGORICAL_FEATURES:
        offset = total - parts[f]
        for category, effect in _levels(f):
            m = _mask(large.categorical[f], category)
            est, se = _offset_mle(large.y[m], offset[m])
            assert abs(est - effect) <= Z * se, (f, category, est, effect, se)


# Upper 0.1% point of chi-square with 6 degrees of freedom (standard tables).
_CHI2_6DF_999 = 22.458


def _chi_square(y: npt.NDArray[np.bool_], values: npt.NDArray[np.object_],
                levels: list[str | None]) -> float:
    """Pearson chi-square of independence for the levels x {bad, good} table."""
    table = np.array([[int(y[m].sum()), int((~y[m]).sum())]
                      for m in (_mask(values, c) for c in levels)], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def test_no_effect_feature_has_indistinguishable_bad_rates(
        large: CategoricalHistories) -> None:
    levels: list[str | None] = [*CATEGORIES["district"], None]
    assert len(levels) - 1 == 6
    stat = _chi_square(large.y, large.categorical["district"], levels)
    assert stat < _CHI2_6DF_999, stat
    # the same test does see a real effect: housing's is the weakest-spread one
    h_levels: list[str | None] = [*CATEGORIES["housing"], None]
    assert _chi_square(large.y, large.categorical["housing"], h_levels) > 10 * _CHI2_6DF_999


# ---------------------------------------------------------------- pandas

def test_to_frame_dtypes_and_values() -> None:
    h = categorical_histories(3_000, 2)
    df = h.to_frame()
    assert list(df.columns) == [*synthetic.FEATURES, *CATEGORICAL_FEATURES]
    assert len(df) == 3_000
    for i, name in enumerate(synthetic.FEATURES):
        assert df[name].dtype == np.float64
        np.testing.assert_array_equal(df[name].to_numpy(), h.X[:, i])
    for f in CATEGORICAL_FEATURES:
        assert isinstance(df[f].dtype, pd.CategoricalDtype)
        assert list(df[f].cat.categories) == list(CATEGORIES[f])
        missing = _mask(h.categorical[f], None)
        np.testing.assert_array_equal(df[f].isna().to_numpy(), missing)
        assert df[f][~missing].astype(str).tolist() == h.categorical[f][~missing].tolist()
    # a rare category absent from a small sample is still declared
    tiny = categorical_histories(20, 0).to_frame()
    assert all(list(tiny[f].cat.categories) == list(CATEGORIES[f])
               for f in CATEGORICAL_FEATURES)
    labelled = h.to_frame(label=True)
    assert labelled.columns[-1] == "bad" and labelled["bad"].dtype == np.bool_
    np.testing.assert_array_equal(labelled["bad"].to_numpy(), h.y)
    # the truth reads a DataFrame's columns directly (NaN = missing)
    np.testing.assert_allclose(true_log_odds_categorical(df), h.log_odds()
                               - synthetic.true_log_odds(h.X), atol=1e-12)
