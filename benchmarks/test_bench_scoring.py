"""Scorecards: Scorecard.score / explain on 1,000,000 accounts x 12 features,
against the plain numpy reference scorer of tests/test_scoring.py (one
np.searchsorted per feature, special codes and NaN by mask), all in one run.

Targets (summary in conftest.py): Scorecard.score threads=1 at least 15x
faster than the numpy reference, and threads=2 at least 1.7x threads=1.
Every benchmark checks its answer: scores (and reason codes) equal the
reference's on all 1M rows.

Scorecard.fit is timed on 200,000 synthetic histories x 12, with the held-out
AUC of its card next to the true model's (figures, not targets).

If optbinning or toad is importable (`pip install '.[test,bench]'`), each is
timed fitting its own scorecard on the same 200k histories, and scoring the
same 1M rows with a card fitted on a sample of them: figures for context in
the same run, not targets; neither is a dependency of qrpay.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from qrpay.scoring import FeatureBins, Scorecard, auc
from qrpay.synthetic import SPECIAL_CODE, true_log_odds, histories

ROWS = 1_000_000
FEATURES = 12
K = 3
NAN_SHARE = 0.02
SPECIAL_SHARE = 0.015


def _load_reference() -> ModuleType:
    """tests/test_scoring.py, under a name of its own: the benchmark's
    baseline is the very reference scorer the tests check the card against."""
    path = Path(__file__).resolve().parent.parent / "tests" / "test_scoring.py"
    name = "_qrpay_bench_scoring_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _realistic(rng: np.random.Generator, rows: int) -> tuple[Scorecard, np.ndarray, np.ndarray]:
    """A 12-feature card of the usual shape (5-7 edges at rounded quantiles,
    1-2 special codes, points monotone in the feature with some noise) and a
    matrix to score: NaN ~2%, special codes ~1.5% per feature. Also returns a
    0/1 default flag drawn from the card's own score (for the optional
    optbinning / toad fits)."""
    columns = [
        rng.beta(2.0, 5.0, rows) * 1.3,                   # utilisation
        rng.gamma(2.0, 20.0, rows),                       # months on book
        rng.poisson(0.4, rows).astype(np.float64),        # late payments, 90 days
        rng.lognormal(7.5, 0.8, rows),                    # monthly spend
        rng.uniform(18, 80, rows),                        # age
        rng.poisson(3.0, rows).astype(np.float64),        # trips per day
        rng.beta(5.0, 2.0, rows),                         # on-time share
        rng.exponential(30.0, rows),                      # days since last top-up
        rng.lognormal(5.0, 1.2, rows),                    # balance
        rng.poisson(1.0, rows).astype(np.float64),        # disputes, 1 year
        rng.normal(0.0, 1.0, rows),                       # a standardised bureau index
        rng.uniform(0, 1, rows),                          # share of night trips
    ]
    features, X = [], np.empty((rows, FEATURES))
    for j, col in enumerate(columns):
        n_edges = 5 + j % 3
        qs = np.quantile(col[:50_000], np.linspace(0, 1, n_edges + 2)[1:-1])
        edges = np.unique(np.round(qs, 3))
        while len(edges) < 5:                             # counts: add spread edges
            edges = np.unique(np.r_[edges, edges[-1] + 1.0])
        slope = rng.choice([-1, 1]) * rng.integers(4, 12)
        points = tuple(int(p) for p in slope * np.arange(len(edges) + 1)
                       + rng.integers(-3, 4, len(edges) + 1))
        codes = (-1.0,) if j % 2 else (-1.0, -2.0)
        specials = tuple((c, int(rng.integers(-25, 10))) for c in codes)
        features.append(FeatureBins(f"feature_{j:02d}", tuple(float(e) for e in edges), points,
                                    int(rng.integers(-20, 5)), specials))
        pick = rng.random(rows)
        col = col.copy()
        col[pick < NAN_SHARE] = np.nan
        special = (pick >= NAN_SHARE) & (pick < NAN_SHARE + SPECIAL_SHARE)
        col[special] = np.array(codes)[rng.integers(0, len(codes), special.sum())]
        X[:, j] = col
    card = Scorecard(tuple(features), base_points=600)
    score = reference.reference_score(card, X)
    z = (score - np.median(score)) / max(1.0, float(np.std(score)))
    bad = (rng.random(rows) < 1 / (1 + np.exp(3.0 + 1.5 * z))).astype(np.int8)
    return card, X, bad


@pytest.fixture(scope="module")
def scoring() -> dict[str, Any]:
    card, X, bad = _realistic(np.random.default_rng(20270115), ROWS)
    want_scores, want_reasons = reference.reference_explain(card, X, K)
    # The data is what the docstring says it is.
    assert 0.015 < np.isnan(X).mean() < 0.025
    assert all(5 <= len(f.edges) <= 7 and 1 <= len(f.specials) <= 2 for f in card.features)
    return {"card": card, "X": X, "bad": bad, "scores": want_scores, "reasons": want_reasons}


def _rows_per_s(benchmark: Any) -> None:
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.median


@pytest.mark.benchmark(group="scoring")
def test_scorecard_numpy_reference(benchmark: Any, scoring: dict[str, Any]) -> None:
    """The baseline: tests/test_scoring.py's reference_score on 1M x 12."""
    scores = benchmark(reference.reference_score, scoring["card"], scoring["X"])
    assert np.array_equal(scores, scoring["scores"])
    _rows_per_s(benchmark)


@pytest.mark.benchmark(group="scoring")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"threads={t}")
def test_scorecard_score(benchmark: Any, scoring: dict[str, Any], threads: int) -> None:
    card: Scorecard = scoring["card"]
    scores = benchmark(card.score, scoring["X"], threads=threads)
    assert np.array_equal(scores, scoring["scores"])
    _rows_per_s(benchmark)


@pytest.mark.benchmark(group="scoring")
def test_scorecard_explain(benchmark: Any, scoring: dict[str, Any]) -> None:
    """Scores and the top-3 reason codes per row, threads=1."""
    card: Scorecard = scoring["card"]
    scores, reasons = benchmark(card.explain, scoring["X"], k=K, threads=1)
    assert np.array_equal(scores, scoring["scores"])
    assert np.array_equal(reasons, scoring["reasons"])
    _rows_per_s(benchmark)


# ---------------------------------------------------------------- fitting
# Scorecard.fit on 200,000 synthetic histories x 12 features (a figure, not a
# target), and the held-out AUC of the card it makes next to the AUC of the
# true model that generated the defaults (the ceiling).

FIT_TRAIN = 200_000
FIT_HELD_OUT = 50_000


@pytest.fixture(scope="module")
def history() -> dict[str, Any]:
    X, y, names = histories(FIT_TRAIN + FIT_HELD_OUT, seed=20270115)
    return {"train": (X[:FIT_TRAIN], y[:FIT_TRAIN]), "held_out": (X[FIT_TRAIN:], y[FIT_TRAIN:]),
            "names": names, "ceiling": auc(-true_log_odds(X[FIT_TRAIN:]), y[FIT_TRAIN:])}


@pytest.mark.benchmark(group="scoring-fit")
def test_scorecard_fit(benchmark: Any, history: dict[str, Any]) -> None:
    X, y = history["train"]
    card = benchmark(Scorecard.fit, X, y, history["names"], special_codes=(SPECIAL_CODE,))
    held_X, held_y = history["held_out"]
    quality = auc(card.score(held_X), held_y)
    benchmark.extra_info.update(auc=round(quality, 4), ceiling=round(history["ceiling"], 4))
    assert quality > history["ceiling"] - 0.03   # close to what the data allows
    for feature in card.features:                # every card the fit made is monotonic
        steps = np.diff(feature.points)
        assert (steps >= 0).all() or (steps <= 0).all(), feature


# ---------------------------------------------------------------- optional peers
# Not dependencies of qrpay: measured only where already importable.

FIT_ROWS = 100_000


@pytest.mark.benchmark(group="scoring-peers")
def test_scorecard_optbinning(benchmark: Any, scoring: dict[str, Any]) -> None:
    """optbinning.Scorecard.score on the same 1M rows (its own card, fitted on
    100k rows with the same special codes)."""
    optbinning = pytest.importorskip("optbinning")
    pd = pytest.importorskip("pandas")
    from sklearn.linear_model import LogisticRegression

    names = list(scoring["card"].feature_names)
    frame = pd.DataFrame(scoring["X"], columns=names)
    binning = optbinning.BinningProcess(
        names, special_codes=[-1.0, -2.0], max_n_bins=8)
    card = optbinning.Scorecard(
        binning_process=binning, estimator=LogisticRegression(), scaling_method="pdo_odds",
        scaling_method_params={"pdo": 20, "odds": 50, "scorecard_points": 600})
    card.fit(frame.iloc[:FIT_ROWS], scoring["bad"][:FIT_ROWS])
    scores = benchmark(card.score, frame)
    assert scores.shape == (ROWS,) and np.isfinite(scores).all()
    _rows_per_s(benchmark)


@pytest.mark.benchmark(group="scoring-peers")
def test_scorecard_toad(benchmark: Any, scoring: dict[str, Any]) -> None:
    """toad.ScoreCard.predict on the same 1M rows (its own card, fitted on 100k rows)."""
    toad = pytest.importorskip("toad")
    pd = pytest.importorskip("pandas")

    names = list(scoring["card"].feature_names)
    frame = pd.DataFrame(scoring["X"], columns=names)
    train = frame.iloc[:FIT_ROWS].copy()
    train["bad"] = scoring["bad"][:FIT_ROWS]
    combiner = toad.transform.Combiner()
    combiner.fit(train, y="bad", method="dt", min_samples=0.05, n_bins=7, empty_separate=True)
    woe = toad.transform.WOETransformer()
    train_woe = woe.fit_transform(combiner.transform(train), train["bad"], exclude=["bad"])
    card = toad.ScoreCard(combiner=combiner, transer=woe, base_score=600, base_odds=50, pdo=20)
    card.fit(train_woe[names], train["bad"])
    scores = benchmark(card.predict, frame)
    assert len(scores) == ROWS and np.isfinite(scores).all()
    _rows_per_s(benchmark)


def _peer_fit_auc(benchmark: Any, history: dict[str, Any], fit: Any, score: Any) -> None:
    """Time `fit(frame, y)` on the 200k training histories (3 rounds: a peer's
    fit takes seconds), then report its card's held-out AUC."""
    pd = pytest.importorskip("pandas")
    X, y = history["train"]
    frame = pd.DataFrame(X, columns=list(history["names"]))
    model = benchmark.pedantic(fit, args=(frame, y.astype(np.int8)), rounds=3, iterations=1)
    held_X, held_y = history["held_out"]
    quality = auc(np.asarray(score(model, pd.DataFrame(held_X, columns=list(history["names"])))),
                  held_y)
    benchmark.extra_info.update(auc=round(quality, 4), ceiling=round(history["ceiling"], 4))
    assert quality > 0.6


@pytest.mark.benchmark(group="scoring-fit")
def test_scorecard_fit_optbinning(benchmark: Any, history: dict[str, Any]) -> None:
    """optbinning.Scorecard.fit (monotonic binning picked per feature, the same
    special code, a logistic regression) on the same 200k histories."""
    optbinning = pytest.importorskip("optbinning")
    from sklearn.linear_model import LogisticRegression

    def fit(frame: Any, y: Any) -> Any:
        binning = optbinning.BinningProcess(
            list(frame.columns), special_codes=[SPECIAL_CODE], max_n_bins=6,
            binning_fit_params={name: {"monotonic_trend": "auto_asc_desc"}
                                for name in frame.columns})
        card = optbinning.Scorecard(
            binning_process=binning, estimator=LogisticRegression(), scaling_method="pdo_odds",
            scaling_method_params={"pdo": 20, "odds": 50, "scorecard_points": 600})
        return card.fit(frame, y)

    _peer_fit_auc(benchmark, history, fit, lambda card, frame: card.score(frame))


@pytest.mark.benchmark(group="scoring-fit")
def test_scorecard_fit_toad(benchmark: Any, history: dict[str, Any]) -> None:
    """toad: decision-tree binning, WOE, ScoreCard.fit on the same 200k histories
    (toad has no monotonic constraint)."""
    toad = pytest.importorskip("toad")

    def fit(frame: Any, y: Any) -> Any:
        train = frame.assign(bad=y)
        combiner = toad.transform.Combiner()
        combiner.fit(train, y="bad", method="dt", min_samples=0.05, n_bins=6,
                     empty_separate=True)
        woe = toad.transform.WOETransformer()
        train_woe = woe.fit_transform(combiner.transform(train), train["bad"], exclude=["bad"])
        card = toad.ScoreCard(combiner=combiner, transer=woe, base_score=600, base_odds=50,
                              pdo=20)
        return card.fit(train_woe[list(frame.columns)], train["bad"])

    _peer_fit_auc(benchmark, history, fit, lambda card, frame: card.predict(frame))
