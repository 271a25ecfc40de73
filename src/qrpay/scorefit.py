"""Fitting a scorecard: monotonic binning, WOE, L2 logistic regression, points.

numpy only, and plain data out: `qrpay.scoring.Scorecard.fit` turns a
`FitResult` into a card, so this module must not import qrpay.scoring.

Per feature, NaN takes a missing bin and each special code a bin of its own;
the other values start in up to 20 quantile bins, which are pooled until the
bad rate is strictly monotonic in the feature's trend (pool adjacent
violators), then merged (closest bad rates first) until every bin holds at
least `min_bin_share` of the feature's numeric rows and at most `max_bins`
bins remain. Each bin gets a weight of evidence (WOE), the features are
replaced by their bins' WOE, and a logistic regression of bad on WOE sets one
coefficient per feature. Points follow the usual points-to-double-odds
scaling, so the card's score is a monotone transform of the model's logit
up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay.errors import InvalidArgument

TRENDS = ("increasing", "decreasing")
MIN_ROWS = 10
INITIAL_BINS = 20
SMOOTHING = 0.5
MAX_POINTS = 1_000_000      # FeatureBins refuses larger point values
_NEWTON_ITERATIONS = 100

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureFit:
    """One fitted feature. Numeric bin b holds edges[b-1] <= x < edges[b]."""

    edges: tuple[float, ...]                         # strictly increasing, finite
    numeric_points: tuple[int, ...]                  # len(edges) + 1
    missing_points: int
    special_points: tuple[tuple[float, int], ...]    # (code, points), every code given
    woe: tuple[float, ...]                           # numeric bins, missing, specials
    iv: float
    trend: str                                       # bad rate vs value
    bad_rate: tuple[float, ...]                      # per numeric bin


@dataclass(frozen=True)
class FitResult:
    features: tuple[FeatureFit, ...]
    base_points: int
    intercept: float
    coefficients: tuple[float, ...]                  # the numeric features', then `extra`'s
    scaling: dict[str, float]                        # base_score, base_odds, pdo
    extra_points: tuple[tuple[int, ...], ...] = ()   # per extra column: points per WOE value


@dataclass
class _Bin:
    rows: float
    bads: float
    upper: float        # upper edge of the bin; inf for the last one

    @property
    def rate(self) -> float:
        return self.bads / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class _Binned:
    """A feature's binning before the regression."""

    edges: tuple[float, ...]
    trend: str
    woe: Floats           # per bin: numeric bins, missing, specials
    iv: float
    bad_rate: tuple[float, ...]


def fit(X: npt.ArrayLike, y: npt.ArrayLike, *, trend: str | Sequence[str] = "auto",
        special_codes: Sequence[float] | Mapping[int, Sequence[float]] = (),
        max_bins: int = 6, min_bin_share: float = 0.05, l2: float = 1.0,
        base_score: float = 600.0, base_odds: float = 50.0, pdo: float = 20.0,
        extra: Sequence[tuple[Floats, Floats]] = ()) -> FitResult:
    """Fit a scorecard to X (rows x features, NaN = missing) and y (1 = bad).

    `extra` adds features binned elsewhere (categorical ones, qrpay.catfit):
    per feature, each row's WOE and the feature's WOE values; they enter the
    regression beside the numeric ones, and `extra_points` gives the points
    of each WOE value. X may then have no column.

    `trend` is "increasing" (more of the feature, more bads), "decreasing",
    or "auto" (whichever monotonic binning has the higher information value),
    either one for all features or one per feature. `special_codes` apply to
    every feature, or map a feature index to its own codes; every code given
    gets a bin, even one no row takes.

    WOE per bin = ln(good share / bad share), with 0.5 added to each bin's good
    and bad counts so that a pure bin stays finite. A bin no row falls in (no
    missing values, a special code that never occurs) gets WOE 0 and so 0
    points: the neutral, population-average evidence. Its bad rate, where
    reported, is the overall bad rate. IV = sum (good% - bad%) * WOE.

    The regression minimises the negative log-likelihood plus
    l2 / 2 * |coefficients|^2 (the intercept is not penalised) by Newton's
    method. Points: factor = pdo / ln 2, offset = base_score - factor *
    ln(base_odds) (odds good:bad); base_points = round(offset - factor * b0),
    a bin's points = round(-factor * b_f * woe). Raises InvalidArgument for
    bad input or a fit whose points would not fit a card.
    """
    matrix, bad = _check_data(X, y, allow_empty=bool(extra))
    n_features = matrix.shape[1]
    empty = np.flatnonzero(np.isnan(matrix).all(axis=0))
    if len(empty):
        # It would be fitted as an all-missing bin worth 0 points: a column
        # that lost its data (a join gone wrong), not a feature.
        raise InvalidArgument(f"feature {int(empty[0])} (from 0) is missing (NaN) in every row: "
                              "there is nothing to fit; drop it or fill it in")
    trends = _check_trend(trend, n_features)
    specials = _check_specials(special_codes, n_features)
    max_bins, min_bin_share = _check_binning(max_bins, min_bin_share)
    l2, base_score, base_odds, pdo = _check_scaling(l2, base_score, base_odds, pdo)

    binned = [_bin_feature(matrix[:, f], bad, trends[f], specials[f], max_bins, min_bin_share)
              for f in range(n_features)]
    design = np.empty((len(bad), n_features + len(extra)), dtype=np.float64)
    for f, b in enumerate(binned):
        design[:, f] = b.woe[_bin_index(matrix[:, f], b.edges, specials[f])]
    for e, (column, _values) in enumerate(extra):
        design[:, n_features + e] = column
    intercept, coefficients = _logistic(design, bad, l2)

    factor = pdo / math.log(2.0)
    offset = base_score - factor * math.log(base_odds)
    base_points = _to_points(offset - factor * intercept)
    features = []
    for f, b in enumerate(binned):
        points = [_to_points(-factor * coefficients[f] * w) for w in b.woe]
        k = len(b.edges) + 1
        features.append(FeatureFit(
            edges=b.edges, numeric_points=tuple(points[:k]), missing_points=points[k],
            special_points=tuple(zip(specials[f], points[k + 1:])),
            woe=tuple(float(w) for w in b.woe), iv=b.iv, trend=b.trend,
            bad_rate=b.bad_rate))
    extra_points = tuple(
        tuple(_to_points(-factor * coefficients[n_features + e] * w) for w in values.tolist())
        for e, (_column, values) in enumerate(extra))
    return FitResult(tuple(features), base_points, intercept, tuple(coefficients),
                     {"base_score": base_score, "base_odds": base_odds, "pdo": pdo},
                     extra_points)


# -- input checks ---------------------------------------------------------------------------

def _check_data(X: npt.ArrayLike, y: npt.ArrayLike, allow_empty: bool = False
                ) -> tuple[Floats, Floats]:
    try:
        matrix = np.asarray(X)
        labels = np.asarray(y)
    except (TypeError, ValueError) as exc:     # ragged lists and the like
        raise InvalidArgument(f"X and y must be arrays: {exc}") from None
    if matrix.dtype.kind not in "biuf" or labels.dtype.kind not in "biuf":
        raise InvalidArgument("X and y must be numeric")
    if matrix.ndim != 2 or (matrix.shape[1] < 1 and not allow_empty):
        raise InvalidArgument("X must be (rows, features) with at least one feature")
    if labels.ndim != 1 or len(labels) != matrix.shape[0]:
        raise InvalidArgument("y must have one label per row of X")
    if len(labels) < MIN_ROWS:
        raise InvalidArgument(f"fit needs at least {MIN_ROWS} rows")
    return np.ascontiguousarray(matrix, dtype=np.float64), good_and_bad(labels, "y")


def good_and_bad(labels: npt.NDArray[Any], name: str) -> Floats:
    """Numeric labels as 0.0 (good) and 1.0 (bad), with both present."""
    bad = labels.astype(np.float64)
    if not np.all((bad == 0.0) | (bad == 1.0)):
        raise InvalidArgument(f"{name} must be 0 (good) or 1 (bad)")
    n_bad = int(bad.sum())
    if n_bad == 0 or n_bad == len(bad):
        raise InvalidArgument(f"{name} needs both goods and bads")
    return bad


def _check_trend(trend: str | Sequence[str], n_features: int) -> list[str]:
    # A str is itself a Sequence[str]: test for it first.
    trends = [trend] * n_features if isinstance(trend, str) else _as_list(trend, "trend")
    if len(trends) != n_features:
        raise InvalidArgument("trend: one per feature, or one for all")
    for t in trends:
        if not isinstance(t, str) or t not in (*TRENDS, "auto"):
            raise InvalidArgument(f"trend must be increasing, decreasing or auto, not {t!r:.80}")
    return [str(t) for t in trends]


def _check_specials(special_codes: Sequence[float] | Mapping[int, Sequence[float]],
                    n_features: int) -> list[tuple[float, ...]]:
    if isinstance(special_codes, Mapping):
        out: list[tuple[float, ...]] = [() for _ in range(n_features)]
        for index, codes in special_codes.items():
            if (not isinstance(index, (int, np.integer)) or isinstance(index, bool)
                    or not 0 <= index < n_features):
                raise InvalidArgument(f"special_codes: no feature {index!r}")
            out[int(index)] = _codes(codes)
        return out
    return [_codes(special_codes)] * n_features


def _codes(codes: Any) -> tuple[float, ...]:
    values: list[float] = []
    for c in _as_list(codes, "special_codes"):
        if isinstance(c, (str, bytes)):
            raise InvalidArgument("special codes are numbers")
        try:
            value = _args.real(c)
        except (TypeError, ValueError):
            raise InvalidArgument("special codes are numbers") from None
        if not math.isfinite(value):
            raise InvalidArgument("special codes must be finite (NaN is the missing bin)")
        if value not in values:
            values.append(value)
    return tuple(values)


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidArgument(f"{what} must be a sequence")
    try:
        return list(items)
    except TypeError:   # a 0-d array is Iterable, yet iterating it raises
        raise InvalidArgument(f"{what} must be a sequence") from None


def _check_binning(max_bins: int, min_bin_share: float) -> tuple[int, float]:
    if isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer)) or max_bins < 1:
        raise InvalidArgument("max_bins must be an integer >= 1")
    share = _finite(min_bin_share, "min_bin_share")
    if not 0.0 <= share <= 1.0:
        raise InvalidArgument("min_bin_share must be between 0 and 1")
    return int(max_bins), share


def _check_scaling(l2: float, base_score: float, base_odds: float, pdo: float
                   ) -> tuple[float, float, float, float]:
    l2, base_score = _finite(l2, "l2"), _finite(base_score, "base_score")
    base_odds, pdo = _finite(base_odds, "base_odds"), _finite(pdo, "pdo")
    if l2 < 0:
        raise InvalidArgument("l2 must be >= 0")
    if base_odds <= 0 or pdo <= 0:
        raise InvalidArgument("base_odds and pdo must be positive")
    return l2, base_score, base_odds, pdo


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be a number")
    try:
        out = _args.real(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a number") from None
    if not math.isfinite(out):
        raise InvalidArgument(f"{name} must be finite")
    return out


# -- binning --------------------------------------------------------------------------------

def _bin_index(column: Floats, edges: tuple[float, ...], codes: tuple[float, ...]
               ) -> npt.NDArray[np.intp]:
    """Each row's bin, in the card's order: numeric bins, missing, specials.
    Same rule as the scoring kernel: a special code wins over any numeric bin."""
    k = len(edges) + 1
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), column, side="right")
    index[np.isnan(column)] = k
    for j, code in enumerate(codes):
        index[column == code] = k + 1 + j
    return index


def _bin_feature(column: Floats, bad: Floats, trend: str, codes: tuple[float, ...],
                 max_bins: int, min_bin_share: float) -> _Binned:
    numeric = ~np.isnan(column)
    for code in codes:
        numeric &= column != code
    values = column[numeric]
    finite = values[np.isfinite(values)]
    if len(finite):
        # Data values as edges (inverted_cdf), and none at the minimum: then no
        # initial bin is empty, and edges read naturally for integer features.
        quantiles = np.quantile(finite, np.linspace(0, 1, INITIAL_BINS + 1)[1:-1],
                                method="inverted_cdf")
        edges = np.unique(quantiles)
        edges = edges[edges > finite.min()]
    else:
        edges = np.zeros(0)
    index = np.searchsorted(edges, values, side="right")
    rows = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    bads = np.bincount(index, weights=bad[numeric], minlength=len(edges) + 1)
    # Only a feature with no numeric rows has an empty bin (its only one).
    initial = [_Bin(float(r), float(b), float(u))
               for r, b, u in zip(rows, bads, [*edges.tolist(), math.inf])]

    # The missing and special bins do not depend on the trend.
    other_rows = [float(np.count_nonzero(np.isnan(column)))]
    other_bads = [float(bad[np.isnan(column)].sum())]
    for code in codes:
        mask = column == code
        other_rows.append(float(np.count_nonzero(mask)))
        other_bads.append(float(bad[mask].sum()))
    overall = float(bad.mean())
    total_bads, total_rows = float(bad.sum()), float(len(bad))

    def build(direction: str) -> _Binned:
        bins = _monotonic(initial, direction)
        bins = _merge_small(bins, min_bin_share * len(values), max_bins)
        all_rows = np.array([b.rows for b in bins] + other_rows)
        all_bads = np.array([b.bads for b in bins] + other_bads)
        woe, iv = _woe(all_rows, all_bads, total_rows, total_bads)
        return _Binned(tuple(b.upper for b in bins[:-1]), direction, woe, iv,
                       tuple(b.rate if b.rows else overall for b in bins))

    if trend != "auto":
        return build(trend)
    up, down = build("increasing"), build("decreasing")
    if abs(up.iv - down.iv) > 1e-12:
        return up if up.iv > down.iv else down
    # Equal IV (usually one bin either way): follow the raw bins' slope.
    return up if _slope(initial) >= 0 else down


def _monotonic(initial: list[_Bin], trend: str) -> list[_Bin]:
    """Pool adjacent violators until the bad rate is strictly monotonic."""
    sign = 1.0 if trend == "increasing" else -1.0
    out: list[_Bin] = []
    for b in initial:
        out.append(_Bin(b.rows, b.bads, b.upper))
        # rate[-2] >= rate[-1] (increasing), cross-multiplied to avoid dividing.
        while len(out) >= 2 and sign * (out[-2].bads * out[-1].rows
                                         - out[-1].bads * out[-2].rows) >= 0:
            last = out.pop()
            out[-1] = _Bin(out[-1].rows + last.rows, out[-1].bads + last.bads, last.upper)
    return out


def _merge_small(bins: list[_Bin], min_rows: float, max_bins: int) -> list[_Bin]:
    """Merge adjacent bins, closest bad rates first: pairs touching a bin
    below min_rows while there is one, then any pair while too many remain.
    Merging neighbours of a strictly monotonic sequence keeps it so."""
    bins = list(bins)
    while len(bins) > 1:
        pairs = must_merge([b.rows for b in bins], min_rows, max_bins)
        if not pairs:
            break
        i = min(pairs, key=lambda p: abs(bins[p].rate - bins[p + 1].rate))
        a, b = bins[i], bins[i + 1]
        bins[i:i + 2] = [_Bin(a.rows + b.rows, a.bads + b.bads, b.upper)]
    return bins


def must_merge(rows: list[float], min_rows: float, max_bins: int) -> list[int]:
    """The adjacent pairs (by the first's index) one of which must merge
    now: those touching a bin below min_rows while there is one, else any
    while there are more than max_bins bins; none when neither holds."""
    small = [i for i, r in enumerate(rows) if r < min_rows]
    if small:
        return sorted({p for i in small for p in (i - 1, i) if 0 <= p < len(rows) - 1})
    return list(range(len(rows) - 1)) if len(rows) > max_bins else []


def _woe(rows: Floats, bads: Floats, total_rows: float, total_bads: float
         ) -> tuple[Floats, float]:
    goods = rows - bads
    used = rows > 0
    # Smoothed shares over the bins that hold rows, so each set sums to 1.
    good_share = np.where(used, goods + SMOOTHING, 0.0)
    bad_share = np.where(used, bads + SMOOTHING, 0.0)
    good_share /= good_share.sum()
    bad_share /= bad_share.sum()
    woe = np.zeros(len(rows))
    woe[used] = np.log(good_share[used] / bad_share[used])
    iv = float(np.sum((good_share - bad_share) * woe))
    return woe, iv


def _slope(bins: list[_Bin]) -> float:
    """Sign of the row-weighted covariance of bin position and bad rate."""
    rows = np.array([b.rows for b in bins])
    if rows.sum() == 0:
        return 0.0
    rate = np.array([b.rate for b in bins])
    pos = np.arange(len(bins), dtype=np.float64)
    w = rows / rows.sum()
    return float(np.sum(w * (pos - np.sum(w * pos)) * (rate - np.sum(w * rate))))


# -- regression and points ------------------------------------------------------------------

def _logistic(design: Floats, bad: Floats, l2: float) -> tuple[float, list[float]]:
    """L2-penalised logistic regression by Newton's method with step halving
    (halving keeps the loss falling when a separable sample has no optimum)."""
    n, k = design.shape
    Z = np.hstack([np.ones((n, 1)), design])
    penalty = np.full(k + 1, l2)
    penalty[0] = 0.0
    # A whisker of ridge keeps the Hessian invertible when a column is
    # constant (a feature left with one bin has WOE 0 everywhere).
    jitter = 1e-9 * n
    rate = float(bad.mean())
    beta = np.zeros(k + 1)
    beta[0] = math.log(rate / (1.0 - rate))

    def loss(b: Floats) -> float:
        z = Z @ b
        # log(1 + e^z) - y z, written to stay finite for large |z|.
        return float(np.sum(np.logaddexp(0.0, z) - bad * z) + 0.5 * np.sum(penalty * b * b))

    current = loss(beta)
    for _ in range(_NEWTON_ITERATIONS):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ beta, -700, 700)))
        gradient = Z.T @ (p - bad) + penalty * beta
        hessian = (Z.T * (p * (1.0 - p))) @ Z + np.diag(penalty + jitter)
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        t = 1.0
        while t > 1e-10:
            candidate = beta - t * step
            value = loss(candidate)
            if value <= current:
                break
            t /= 2
        else:
            break
        beta, previous, current = candidate, current, value
        if previous - current <= 1e-10 * max(1.0, abs(current)):
            break
    if not np.all(np.isfinite(beta)):
        raise InvalidArgument("the regression did not converge")
    return float(beta[0]), [float(b) for b in beta[1:]]


def _to_points(value: float) -> int:
    if not math.isfinite(value) or abs(value) > MAX_POINTS:
        raise InvalidArgument("points out of range: is the sample separable? try a larger l2")
    return int(round(value))
