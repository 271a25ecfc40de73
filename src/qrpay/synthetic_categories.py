"""Synthetic credit histories with categorical features whose effect is known.

`categorical_histories(n, seed)` returns the numeric features exactly as
`qrpay.synthetic.histories(n, seed)` makes them, plus six categorical columns a
credit system would hold (employment type, housing, purpose of the credit,
insurance status, district, phone plan). Each column is a numpy object array
of strings with some missing values (None) and one rare category (under 1% of
rows).

The truth is published here: `EFFECTS[feature][category]` is the category's
additive contribution to the log-odds of default and `MISSING_EFFECT[feature]`
that of a missing value. The label is drawn from

    synthetic.true_log_odds(X) + sum of the six contributions

so a perfect model ranks by `CategoricalHistories.log_odds()`. Some categories
share an effect on purpose (a good binning puts them in one bin, e.g.
"own" and "mortgage"; the rare "pensioner" with "salaried"), and `district`
has no effect at all (`NO_EFFECT`).

The categories are drawn independently of the numeric features and of each
other, from their own random stream, so the numeric columns are untouched and
a category's empirical bad rate orders the categories exactly as their
contributions do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt

from qrpay import synthetic
from qrpay.errors import InvalidArgument

ObjectArray = npt.NDArray[np.object_]

# feature -> category -> (share of rows, log-odds contribution). Missing is
# stated apart in _MISSING; shares plus the missing share sum to 1.
_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "employment_type": {
        "salaried": (0.420, -0.30),
        "civil_servant": (0.100, -0.30),
        "self_employed": (0.140, 0.00),
        "gig_driver": (0.120, 0.30),
        "gig_courier": (0.090, 0.30),
        "student": (0.045, 0.30),
        "unemployed": (0.049, 0.80),
        "pensioner": (0.006, -0.30),         # rare, same effect as salaried
    },
    "housing": {
        "own": (0.380, -0.35),
        "mortgage": (0.170, -0.35),
        "rent": (0.270, 0.00),
        "with_family": (0.155, 0.25),
        "dormitory": (0.005, 0.60),          # rare
    },
    "purpose": {
        "phone": (0.220, 0.00),
        "appliance": (0.180, 0.00),
        "vehicle": (0.120, 0.00),
        "education": (0.100, -0.30),
        "medical": (0.090, 0.30),
        "travel": (0.080, 0.30),
        "debt_consolidation": (0.100, 0.60),
        "business": (0.063, 0.60),
        "crypto": (0.007, 1.00),             # rare
    },
    "insurance_status": {
        "employer": (0.460, -0.40),
        "voluntary": (0.120, -0.40),
        "resident_basic": (0.210, 0.00),
        "none": (0.152, 0.50),
        "lapsed": (0.008, 0.90),             # rare
    },
    "district": {                            # no effect at all
        "central": (0.250, 0.0),
        "north": (0.200, 0.0),
        "south": (0.200, 0.0),
        "east": (0.170, 0.0),
        "west": (0.160, 0.0),
        "airport_zone": (0.005, 0.0),        # rare
    },
    "phone_plan": {
        "postpaid": (0.300, -0.25),
        "postpaid_family": (0.160, -0.25),
        "prepaid_monthly": (0.280, 0.00),
        "prepaid_payg": (0.234, 0.35),
        "corporate": (0.006, -0.60),         # rare
    },
}

# feature -> (share of rows missing, log-odds contribution of missing).
_MISSING: dict[str, tuple[float, float]] = {
    "employment_type": (0.030, 0.30),
    "housing": (0.020, 0.20),
    "purpose": (0.040, 0.40),
    "insurance_status": (0.050, 0.50),       # same effect as "none"
    "district": (0.015, 0.00),
    "phone_plan": (0.020, 0.45),
}

CATEGORICAL_FEATURES: tuple[str, ...] = tuple(_TABLE)

# The categories of each feature, in the order they are published.
CATEGORIES: dict[str, tuple[str, ...]] = {f: tuple(c) for f, c in _TABLE.items()}

# The truth: feature -> category -> additive contribution to the log-odds of default.
EFFECTS: dict[str, dict[str, float]] = {
    f: {c: eff for c, (_share, eff) in cats.items()} for f, cats in _TABLE.items()}

# Contribution to the log-odds of a missing value (None), per feature.
MISSING_EFFECT: dict[str, float] = {f: eff for f, (_share, eff) in _MISSING.items()}

# Expected share of rows per category, and of missing rows, per feature.
SHARES: dict[str, dict[str, float]] = {
    f: {c: share for c, (share, _eff) in cats.items()} for f, cats in _TABLE.items()}
MISSING_SHARE: dict[str, float] = {f: share for f, (share, _eff) in _MISSING.items()}

# The one category per feature drawn in under 1% of rows.
RARE: dict[str, str] = {f: min(s, key=s.__getitem__) for f, s in SHARES.items()}

# Features whose categories (and missing) all contribute nothing.
NO_EFFECT: tuple[str, ...] = tuple(
    f for f in CATEGORICAL_FEATURES
    if MISSING_EFFECT[f] == 0.0 and all(e == 0.0 for e in EFFECTS[f].values()))

for _f in CATEGORICAL_FEATURES:  # guard the table against edits that break it
    assert abs(sum(SHARES[_f].values()) + MISSING_SHARE[_f] - 1.0) < 1e-9, _f
    assert SHARES[_f][RARE[_f]] < 0.01, _f

# Added to the seed so the categorical stream is independent of the numeric one.
_STREAM = 16


@dataclass(frozen=True, eq=False)
class CategoricalHistories:
    """Numeric features `X` (n x 12, float64, NaN = missing, named by
    `numeric_features`), categorical features `categorical` (name -> object
    array of str, None = missing) and the label `y` (True = defaulted)."""

    X: npt.NDArray[np.float64]
    y: npt.NDArray[np.bool_]
    numeric_features: tuple[str, ...]
    categorical: dict[str, ObjectArray]

    @property
    def categorical_features(self) -> tuple[str, ...]:
        return CATEGORICAL_FEATURES

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def log_odds(self) -> npt.NDArray[np.float64]:
        """The true log-odds of default the label was drawn from."""
        out: npt.NDArray[np.float64] = (synthetic.true_log_odds(self.X)
                                        + true_log_odds_categorical(self.categorical))
        return out

    def to_frame(self, label: bool = False) -> Any:
        """A pandas DataFrame: the numeric columns as float64, then the
        categorical ones as "category" dtype (every published category is
        declared, even one absent from the sample; missing is NaN). With
        `label=True` a last bool column "bad" holds y. Needs pandas."""
        try:
            pd: Any = importlib.import_module("pandas")
        except ImportError as exc:  # pragma: no cover - pandas is a test dependency
            raise ImportError("to_frame needs pandas: pip install pandas") from exc
        data: dict[str, Any] = {
            name: np.asarray(self.X[:, i], dtype=np.float64)
            for i, name in enumerate(self.numeric_features)}
        for name in CATEGORICAL_FEATURES:
            data[name] = pd.Categorical(self.categorical[name],
                                        categories=list(CATEGORIES[name]))
        if label:
            data["bad"] = np.asarray(self.y, dtype=bool)
        return pd.DataFrame(data)


def categorical_histories(n: int, seed: int = 0) -> CategoricalHistories:
    """n synthetic accounts with 12 numeric and 6 categorical features.
    Deterministic for a seed; X equals `synthetic.histories(n, seed)[0]`, the
    label is redrawn with the categorical contributions added."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgument("n must be a non-negative integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidArgument("seed must be a non-negative integer")
    n = int(n)
    X, _y, names = synthetic.histories(n, int(seed))
    rng = np.random.default_rng([int(seed), _STREAM])
    cats: dict[str, ObjectArray] = {}
    logit = synthetic.true_log_odds(X)
    for feature in CATEGORICAL_FEATURES:
        labels = np.array([*CATEGORIES[feature], None], dtype=object)
        probs = np.array([*SHARES[feature].values(), MISSING_SHARE[feature]])
        effects = np.array([*EFFECTS[feature].values(), MISSING_EFFECT[feature]])
        idx = rng.choice(labels.shape[0], size=n, p=probs / probs.sum())
        cats[feature] = labels[idx]
        logit = logit + effects[idx]
    y: npt.NDArray[np.bool_] = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return CategoricalHistories(X=X, y=y, numeric_features=names, categorical=cats)


def true_log_odds_categorical(cats: Mapping[str, Any]) -> npt.NDArray[np.float64]:
    """The categorical part of the true log-odds: per row, the sum of the six
    features' contributions (`EFFECTS`, `MISSING_EFFECT` for None or NaN).
    `cats` maps every name in CATEGORICAL_FEATURES to an array-like of equal
    length (a numpy object array, a list or a pandas column); a value that is
    not a published category raises InvalidArgument, as its truth is undefined."""
    missing_names = [f for f in CATEGORICAL_FEATURES if f not in cats]
    if missing_names:
        raise InvalidArgument(f"missing categorical features: {', '.join(missing_names)}")
    total: npt.NDArray[np.float64] | None = None
    for feature in CATEGORICAL_FEATURES:
        values = np.asarray(cats[feature], dtype=object)
        if values.ndim != 1:
            raise InvalidArgument(f"{feature} must be one-dimensional")
        if total is None:
            total = np.zeros(values.shape[0], dtype=np.float64)
        elif values.shape[0] != total.shape[0]:
            raise InvalidArgument("categorical features must have the same length")
        # Elementwise on object arrays: None == None, and NaN is the one value != itself.
        missing = np.asarray(values == None) | np.asarray(values != values)  # noqa: E711
        matched = missing.copy()
        contrib = np.where(missing, MISSING_EFFECT[feature], 0.0)
        for category, effect in EFFECTS[feature].items():
            hit = np.asarray(values == category)
            matched |= hit
            contrib[hit] = effect
        if not matched.all():
            bad = values[~matched][0]
            raise InvalidArgument(f"{feature}: {bad!r} is not a published category")
        total += contrib
    return total if total is not None else np.zeros(0, dtype=np.float64)
