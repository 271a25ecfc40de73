"""Scorecards: score accounts in the compiled core, explain each score with
reason codes, and turn scores into offline credit limits (docs/SCORING.md).

A card is per feature: bin edges, a missing bin, bins for special codes, and
integer points per bin; score = base points + the points of each feature's
bin. `Scorecard.fit` (scorefit.py) learns one from history.
"""

from __future__ import annotations

import functools
import importlib
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from qrpay import _args, catfit, scorefit
from qrpay._impl import core
from qrpay.credential import Credential, Scene
from qrpay.errors import InvalidArgument, InvalidKey, IssuerKeyRole, MalformedMessage
from qrpay.format import TAG_CARD
from qrpay.keys import DevicePublicKey, IssuerKey
from qrpay.trust import Role, TrustStore
from qrpay.wire import body_map, sign_document, split_document, unpack_strict, verify_document

CARD_FORMAT = 1
MAX_FEATURES = 64
MAX_THREADS = _args.MAX_THREADS
MAX_PSI_BINS = 10_000
# The fields of a signed card document (Scorecard.sign; qrpay inspect reads them too).
SIGNED_CARD_FIELDS: dict[str, type | tuple[type, ...]] = {"v": int, "kid": bytes,
                                                          "card": bytes}


@dataclass(frozen=True)
class FeatureBins:
    """One feature of a card. Numeric bin b holds edges[b-1] <= x < edges[b]
    (the first and last bins are open-ended, so every number, +-inf included,
    falls in exactly one); NaN takes the missing bin; a value equal to a
    special code takes that code's bin, before any numeric bin."""

    name: str
    edges: tuple[float, ...]
    points: tuple[int, ...]                      # one per numeric bin: len(edges) + 1
    missing_points: int
    specials: tuple[tuple[float, int], ...] = ()  # (code, points)
    woe: tuple[float, ...] = ()                  # fit diagnostics, not used to score
    iv: float = 0.0
    trend: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 64:
            raise InvalidArgument("a feature name is 1-64 characters")
        for name in ("edges", "points", "specials", "woe"):
            object.__setattr__(self, name, _sequence(f"{self.name}: {name}", getattr(self, name)))
        if not isinstance(self.trend, str):
            raise InvalidArgument(f"{self.name}: trend is a str")
        # Numbers become floats here, so equal cards have equal canonical bytes.
        try:
            edges = tuple(_args.real(e) for e in self.edges)
            specials = tuple((_args.real(c), p) for c, p in self.specials)
            woe = tuple(_args.real(w) for w in self.woe)
            iv = _args.real(self.iv)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{self.name}: edges, codes, woe and iv are numbers") from None
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "specials", specials)
        object.__setattr__(self, "woe", woe)
        object.__setattr__(self, "iv", iv)
        if not all(math.isfinite(x) for x in (*edges, *woe, iv)):
            raise InvalidArgument(f"{self.name}: edges, woe and iv must be finite")
        if list(self.edges) != sorted(set(self.edges)):
            raise InvalidArgument(f"{self.name}: edges must be strictly increasing numbers")
        if len(self.points) != len(self.edges) + 1:
            raise InvalidArgument(f"{self.name}: one point value per numeric bin")
        codes = [c for c, _ in self.specials]
        if any(math.isnan(c) for c in codes) or len(set(codes)) != len(codes):
            raise InvalidArgument(f"{self.name}: special codes are distinct numbers")
        for p in (*self.points, self.missing_points, *(p for _, p in self.specials)):
            if not isinstance(p, int) or isinstance(p, bool) or abs(p) > 1_000_000:
                raise InvalidArgument(f"{self.name}: points are integers")

    @property
    def best_points(self) -> int:
        return max((*self.points, self.missing_points, *(p for _, p in self.specials)))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "edges": list(self.edges), "points": list(self.points),
                "missing_points": self.missing_points,
                "specials": [[c, p] for c, p in self.specials], "woe": list(self.woe),
                "iv": self.iv, "trend": self.trend}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureBins:
        try:
            return cls(str(d["name"]), tuple(float(e) for e in d["edges"]),
                       tuple(int(p) for p in d["points"]), int(d["missing_points"]),
                       tuple((float(c), int(p)) for c, p in d["specials"]),
                       tuple(float(w) for w in d["woe"]), float(d["iv"]), str(d["trend"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"not a card feature: {exc}") from None


MAX_CATEGORIES = 4_096


@dataclass(frozen=True)
class CategoryBins:
    """A categorical feature of a card: named categories grouped into bins,
    each bin with its points (`group_points`, one per group); a missing
    value takes `missing_points`, a category never seen at fit time
    `unseen_points`.

    The kernel scores it as a numeric feature of integer codes: category i
    of `categories` (group by group, each group's names sorted) is code i,
    an unseen one code K. A group's codes are consecutive, so one edge per
    group (after its last code) bins them: `edges`, `points` and `specials`
    read as a FeatureBins' do, and with no more than 8 groups the feature
    takes the kernel's fast path, in the same block pass as the numeric
    ones."""

    name: str
    groups: tuple[tuple[str, ...], ...]
    group_points: tuple[int, ...]
    missing_points: int
    unseen_points: int
    woe: tuple[float, ...] = ()                  # fit diagnostics, not used to score
    iv: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 64:
            raise InvalidArgument("a feature name is 1-64 characters")
        groups = tuple(_sequence(f"{self.name}: a group", g)
                       for g in _sequence(f"{self.name}: groups", self.groups))
        object.__setattr__(self, "groups", groups)
        for name in ("group_points", "woe"):
            object.__setattr__(self, name, _sequence(f"{self.name}: {name}", getattr(self, name)))
        every = [c for g in groups for c in g]
        if not groups or not all(groups):
            raise InvalidArgument(f"{self.name}: one or more groups, each of one or more "
                                  "categories")
        if not all(isinstance(c, str) and 0 < len(c) <= 256 for c in every):
            raise InvalidArgument(f"{self.name}: a category is a name of 1-256 characters")
        if len(set(every)) != len(every) or len(every) > MAX_CATEGORIES:
            raise InvalidArgument(f"{self.name}: categories are distinct, at most "
                                  f"{MAX_CATEGORIES}")
        if len(self.group_points) != len(groups):
            raise InvalidArgument(f"{self.name}: one point value per group")
        for p in (*self.group_points, self.missing_points, self.unseen_points):
            if not isinstance(p, int) or isinstance(p, bool) or abs(p) > 1_000_000:
                raise InvalidArgument(f"{self.name}: points are integers")
        try:
            woe = tuple(_args.real(w) for w in self.woe)
            iv = _args.real(self.iv)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{self.name}: woe and iv are numbers") from None
        if not all(math.isfinite(x) for x in (*woe, iv)):
            raise InvalidArgument(f"{self.name}: woe and iv must be finite")
        object.__setattr__(self, "woe", woe)
        object.__setattr__(self, "iv", iv)
        categories = tuple(c for g in groups for c in sorted(g))
        ends = np.cumsum([len(g) for g in groups])
        by_name = np.argsort(np.asarray(categories, dtype=str), kind="stable")
        object.__setattr__(self, "_categories", categories)
        object.__setattr__(self, "_edges", tuple(float(e) - 0.5 for e in ends))
        object.__setattr__(self, "_sorted", np.asarray(categories, dtype=str)[by_name])
        object.__setattr__(self, "_code_of_sorted", by_name.astype(np.float64))

    @property
    def categories(self) -> tuple[str, ...]:
        """Every category, in code order (category i is code i): group by
        group, each group's names sorted."""
        return self._categories   # type: ignore[attr-defined,no-any-return]

    @property
    def edges(self) -> tuple[float, ...]:
        """One per group, just below the next group's first code (the last
        just below the unseen code)."""
        return self._edges   # type: ignore[attr-defined,no-any-return]

    @property
    def points(self) -> tuple[int, ...]:
        """Points per group, then the unseen code's (as a FeatureBins' per bin)."""
        return (*self.group_points, self.unseen_points)

    @property
    def specials(self) -> tuple[tuple[float, int], ...]:
        return ()

    @property
    def trend(self) -> str:
        return ""

    @property
    def best_points(self) -> int:
        return max((*self.group_points, self.missing_points, self.unseen_points))

    def codes(self, values: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Each value's code as the kernel reads it: its category's index,
        len(categories) for a category never seen, NaN for a missing one
        (None, NaN, pandas' NA, or ""). Strings are matched once per
        column with numpy, not row by row."""
        factorized = _factorized(values)
        if factorized is not None:   # pandas: one lookup per distinct label, not per row
            labels, index = factorized
            out = np.append(self._label_codes(labels), np.nan)[index]   # -1: missing
            return out.astype(np.float64, copy=False)
        return self._label_codes(_labels(values, self.name))

    def _label_codes(self, column: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """codes() of an object array, matched in numpy."""
        missing = _missing(column)
        text = np.where(missing, "", column).astype(str)
        known = self._sorted   # type: ignore[attr-defined]
        at = np.searchsorted(known, text).clip(max=max(len(known) - 1, 0))
        hit = known[at] == text if len(known) else np.zeros(len(text), dtype=np.bool_)
        out = np.where(hit, self._code_of_sorted[at], len(known))   # type: ignore[attr-defined]
        out[missing] = np.nan
        return out.astype(np.float64, copy=False)

    def category_of(self, code: float) -> str:
        """The words a reason gives for a code: the category, "missing" or
        "unseen"."""
        if code != code:
            return "missing"
        if not 0 <= code < len(self.categories) or code != math.floor(code):
            return "unseen"
        return self.categories[int(code)]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "categorical", "name": self.name,
                "groups": [list(g) for g in self.groups],
                "group_points": list(self.group_points), "missing_points": self.missing_points,
                "unseen_points": self.unseen_points, "woe": list(self.woe), "iv": self.iv}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoryBins:
        try:
            return cls(str(d["name"]), tuple(tuple(str(c) for c in g) for g in d["groups"]),
                       tuple(int(p) for p in d["group_points"]), int(d["missing_points"]),
                       int(d["unseen_points"]), tuple(float(w) for w in d["woe"]),
                       float(d["iv"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"not a card's categorical feature: {exc}") from None


Feature = Union[FeatureBins, CategoryBins]


def _factorized(values: Any) -> tuple[npt.NDArray[Any], npt.NDArray[np.intp]] | None:
    """(distinct labels, each row's index into them, -1 when missing) for a
    pandas column or a large object array when pandas is installed; None
    otherwise (the labels are then matched row by row in numpy)."""
    try:
        pd: Any = importlib.import_module("pandas")   # optional, and untyped
    except ImportError:
        return None
    if isinstance(values, pd.Categorical):
        categorical = values
    elif isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        categorical = values.array
    elif isinstance(values, (pd.Series, np.ndarray, list)) and len(values) > 1_000:
        column = values if isinstance(values, pd.Series) else np.asarray(values, dtype=object)
        if getattr(column, "ndim", 1) != 1:
            return None
        categorical = pd.Categorical(column)
    else:
        return None
    labels = np.asarray(categorical.categories.to_numpy(dtype=object), dtype=object)
    return labels, np.asarray(categorical.codes, dtype=np.intp)


def _is_categorical(values: Any) -> bool:
    """A column of labels (strings, objects, pandas' category or string
    dtype), not of numbers."""
    dtype = getattr(values, "dtype", None)
    if dtype is None:
        dtype = np.asarray(values).dtype
    return getattr(dtype, "kind", "O") not in "biuf"


def _labels(values: npt.ArrayLike, name: str) -> npt.NDArray[Any]:
    """A column of category labels as a 1-D object array."""
    to_numpy = getattr(values, "to_numpy", None)   # pandas: Series, Categorical
    try:
        column = np.asarray(to_numpy(dtype=object) if to_numpy is not None else values,
                            dtype=object)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name}: a column of category names") from None
    if column.ndim != 1:
        raise InvalidArgument(f"{name}: a 1-D column of category names")
    return column


_IS_MISSING = np.frompyfunc(catfit.is_missing, 1, 1)   # as the fit reads labels


def _missing(column: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    return np.asarray(_IS_MISSING(column), dtype=np.bool_) if len(column) else np.zeros(
        0, dtype=np.bool_)


@dataclass(frozen=True)
class Scorecard:
    """A versioned scorecard. `score` and `explain` run in the compiled core."""

    features: tuple[Feature, ...]
    base_points: int
    version: int = 1
    scaling: Mapping[str, float] = field(default_factory=dict)   # base_score, base_odds, pdo
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        features = _sequence("features", self.features)
        if not all(isinstance(f, (FeatureBins, CategoryBins)) for f in features):
            raise InvalidArgument("a card's features are FeatureBins or CategoryBins")
        object.__setattr__(self, "features", features)
        if not isinstance(self.scaling, Mapping) or not isinstance(self.metadata, Mapping):
            raise InvalidArgument("scaling and metadata are mappings")
        if not 0 < len(self.features) <= MAX_FEATURES:
            raise InvalidArgument(f"a card has 1-{MAX_FEATURES} features")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise InvalidArgument("feature names must be distinct")
        for name in ("base_points", "version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 2**53:
                raise InvalidArgument(f"{name} is an integer")

    @classmethod
    def fit(cls, X: Any, y: npt.ArrayLike, feature_names: Sequence[str], *,
            trend: str | Sequence[str] = "auto",
            special_codes: Sequence[float] | Mapping[int, Sequence[float]] = (-1.0,),
            max_bins: int = 6, min_bin_share: float = 0.05, l2: float = 1.0,
            base_score: float = 600.0, base_odds: float = 50.0, pdo: float = 20.0,
            version: int = 1) -> Scorecard:
        """Fit a card from history: X (rows x features, NaN = missing), y
        (1 = defaulted). Monotonic binning per feature (`trend`: increasing,
        decreasing or auto), WOE, a regularised logistic regression on WOE, and
        points scaled so that `base_score` means odds `base_odds`:1 good:bad and
        every `pdo` points double the odds. See scorefit.py and docs/SCORING.md."""
        if hasattr(X, "columns") or isinstance(X, Mapping):
            return cls._fit_columns(X, y, feature_names, trend=trend,
                                    special_codes=special_codes, max_bins=max_bins,
                                    min_bin_share=min_bin_share, l2=l2, base_score=base_score,
                                    base_odds=base_odds, pdo=pdo, version=version)
        # X and y as given: scorefit checks and converts them (InvalidArgument).
        result = scorefit.fit(X, y, trend=trend, special_codes=special_codes,
                              max_bins=max_bins, min_bin_share=min_bin_share, l2=l2,
                              base_score=base_score, base_odds=base_odds, pdo=pdo)
        return cls.from_fit(result, feature_names, version)

    @classmethod
    def _fit_columns(cls, X: Any, y: npt.ArrayLike, feature_names: Sequence[str], *,
                     version: int, max_bins: int, min_bin_share: float, **options: Any
                     ) -> Scorecard:
        """fit on a DataFrame or a mapping of columns: a column of strings,
        objects or pandas' category dtype is categorical (qrpay.catfit groups
        its categories), any other numeric; the card keeps feature_names'
        order. An unseen category gets the worst group's points (or the
        missing bin's, if worse): a label never scored is no reason for
        credit."""
        names = list(_sequence("feature_names", feature_names))
        available = list(X.columns) if hasattr(X, "columns") else list(X)
        absent = [n for n in names if n not in available]
        if absent or not names:
            raise InvalidArgument(f"X has no column {absent[0]!r}" if absent
                                  else "name at least one feature")
        labels = np.asarray(y)
        kinds = {n: _is_categorical(X[n]) for n in names}
        numeric = [n for n in names if not kinds[n]]
        matrix = (np.column_stack([Scorecard._numeric_column(X[n], n) for n in numeric])
                  if numeric else np.zeros((len(labels), 0)))
        groupings, extra = {}, []
        for n in (n for n in names if kinds[n]):
            values = _labels(X[n], n)
            if len(values) != len(labels):
                raise InvalidArgument(f"{n}: one value per label")
            grouping = catfit.group_categories(values, labels, min_bin_share=min_bin_share,
                                               max_bins=max_bins)
            woe = np.array([*grouping.woe, grouping.missing_woe or 0.0], dtype=np.float64)
            extra.append((woe[np.minimum(grouping.bin_index(values), len(woe) - 1)], woe))
            groupings[n] = grouping
        result = scorefit.fit(matrix, labels, max_bins=max_bins, min_bin_share=min_bin_share,
                              extra=extra, **options)
        fitted: dict[str, Feature] = {}
        for n, f in zip(numeric, result.features):
            fitted[n] = FeatureBins(n, f.edges, f.numeric_points, f.missing_points,
                                    f.special_points, f.woe, f.iv, f.trend)
        for (n, grouping), points in zip(groupings.items(), result.extra_points):
            group_points, missing = points[:-1], points[-1]
            fitted[n] = CategoryBins(n, grouping.groups, group_points, missing,
                                     min(*group_points, missing), grouping.woe, grouping.iv)
        return cls(tuple(fitted[n] for n in names), result.base_points, version,
                   dict(result.scaling), {"intercept": result.intercept,
                                          "coefficients": list(result.coefficients)})

    @staticmethod
    def _numeric_column(values: Any, name: str) -> npt.NDArray[np.float64]:
        to_numpy = getattr(values, "to_numpy", None)
        try:
            column = np.asarray(to_numpy(dtype=np.float64, na_value=np.nan)
                                if to_numpy is not None else values, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name}: a numeric column") from None
        if column.ndim != 1:
            raise InvalidArgument(f"{name}: a 1-D column")
        return column

    @classmethod
    def from_fit(cls, result: scorefit.FitResult, feature_names: Sequence[str],
                 version: int = 1) -> Scorecard:
        """The card of a scorefit.fit result, one name per fitted feature."""
        names = list(_sequence("feature_names", feature_names))
        if len(names) != len(result.features):
            raise InvalidArgument("one feature name per column of X")
        features = tuple(
            FeatureBins(name, f.edges, f.numeric_points, f.missing_points, f.special_points,
                        f.woe, f.iv, f.trend)
            for name, f in zip(names, result.features))
        return cls(features, result.base_points, version, dict(result.scaling),
                   {"intercept": result.intercept, "coefficients": list(result.coefficients)})

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def _run(self, X: Any, k: int, threads: int
             ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
        array = self.matrix(X)
        count = _args.threads(threads)
        f = self._flat
        return core.score_rows(array, f.edges, f.edge_off, f.points, f.point_off, f.specials,
                               f.special_off, f.best, f.code_limit, self.base_points, k, count)

    @functools.cached_property
    def _flat(self) -> _FlatCard:
        return _flatten(self)

    def matrix(self, X: Any) -> npt.NDArray[np.floating[Any]]:
        """X as the kernel reads it: rows x the card's features, a
        categorical feature as its codes (CategoryBins.codes). X is a pandas
        DataFrame or a mapping of columns (by feature name; categorical
        columns hold names, of any dtype), or a numeric array (n x features)
        whose categorical columns hold codes already: NaN missing, anything
        but a category's index unseen (the kernel checks each code as it
        scores it, so the array is read as it is)."""
        if hasattr(X, "columns") or isinstance(X, Mapping):
            return self._columns(X)
        return _as_matrix(X, len(self.features))

    def _columns(self, X: Any) -> npt.NDArray[np.float64]:
        names = list(X.columns) if hasattr(X, "columns") else list(X)
        missing = [f.name for f in self.features if f.name not in names]
        if missing:
            raise InvalidArgument(f"X has no column {missing[0]!r} (the card reads "
                                  f"{', '.join(self.feature_names)})")
        columns = []
        for feature in self.features:
            values = X[feature.name]
            if isinstance(feature, CategoryBins):
                columns.append(feature.codes(values))
                continue
            columns.append(Scorecard._numeric_column(values, feature.name))
        if len({len(c) for c in columns}) > 1:
            raise InvalidArgument("X's columns differ in length")
        return np.column_stack(columns) if columns else np.zeros((0, 0))

    def score(self, X: Any, threads: int = 1) -> npt.NDArray[np.int64]:
        """Scores for the rows of X: a numeric array (n x features; float32
        or float64, C or Fortran order; other inputs are converted once), or
        a DataFrame or mapping of columns by name (see `matrix`)."""
        return self._run(X, 0, threads)[0]

    def explain(self, X: Any, k: int = 3, threads: int = 1
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
        """Scores and, per row, the k features that cost it the most points
        against their best bin (feature indices, most costly first; -1 where
        fewer than k features lost points). Same pass as `score`."""
        k = _args.integer("k", k, 0, min(8, len(self.features)))
        return self._run(X, k, threads)

    def reason_names(self, reasons: npt.NDArray[np.int16], X: Any = None
                     ) -> list[list[str]]:
        """The feature names of `explain`'s reason codes, row by row; given
        the X they were explained from, a categorical feature's reason names
        the row's category too ("housing = rent", "housing = missing")."""
        names = self.feature_names
        try:
            codes = np.asarray(reasons)
        except (TypeError, ValueError):
            codes = np.asarray(None)
        if codes.ndim != 2 or (codes.size and (codes.dtype.kind not in "iu" or codes.min() < -1
                                               or codes.max() >= len(names))):
            raise InvalidArgument(f"reasons are rows of feature indices in [-1, {len(names)})")
        rows = [[names[i] for i in row if i >= 0] for row in codes.tolist()]
        categorical = [f for f, feature in enumerate(self.features)
                       if isinstance(feature, CategoryBins)]
        if X is None or not categorical:
            return rows
        matrix = self.matrix(X)
        if len(matrix) != len(rows):
            raise InvalidArgument("X has one row per row of reasons")
        for f in categorical:
            feature = self.features[f]
            assert isinstance(feature, CategoryBins)
            for row, column in zip(*np.nonzero(codes == f)):
                rows[row][column] = (f"{feature.name} = "
                                     f"{feature.category_of(float(matrix[row, f]))}")
        return rows

    # -- documents -----------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, "version": self.version, "base_points": self.base_points,
                "scaling": dict(self.scaling), "metadata": dict(self.metadata),
                "features": [f.as_dict() for f in self.features]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scorecard:
        if not isinstance(d, Mapping) or d.get("format") != CARD_FORMAT:
            raise MalformedMessage("not a qrpay scorecard (format 1)")
        try:
            return cls(tuple(CategoryBins.from_dict(f) if f.get("kind") == "categorical"
                             else FeatureBins.from_dict(f) for f in d["features"]),
                       int(d["base_points"]), int(d["version"]), dict(d["scaling"]),
                       dict(d["metadata"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(f"not a scorecard: {exc}") from None

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces, shortest float repr."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Scorecard:
        if not isinstance(text, (str, bytes, bytearray)):
            raise MalformedMessage(f"card JSON is text, not {type(text).__name__}")
        try:
            loaded = json.loads(text)
        except (ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError
            raise MalformedMessage(f"card JSON: {exc}") from None
        return cls.from_dict(loaded)

    def canonical_bytes(self) -> bytes:
        """The bytes an issuer signs: the canonical JSON, UTF-8."""
        return self.to_json().encode("utf-8")

    def to_msgpack(self) -> bytes:
        return msgpack.packb(json.loads(self.to_json()), use_bin_type=True)  # type: ignore[no-any-return]

    @classmethod
    def from_msgpack(cls, data: bytes) -> Scorecard:
        return cls.from_dict(unpack_strict(data, max_map=256, max_array=10_000))

    @property
    def card_id(self) -> str:
        """Short content id: which card produced a limit."""
        return hashlib.blake2b(self.canonical_bytes(), digest_size=8).hexdigest()

    def sign(self, key: IssuerKey) -> bytes:
        """A signed card document (the issuer needs Role.SCORECARD to be trusted for it)."""
        if not isinstance(key, IssuerKey):
            raise InvalidKey("a card is signed with an IssuerKey")
        return sign_document(key, TAG_CARD, {"v": CARD_FORMAT, "kid": key.kid,
                                             "card": self.canonical_bytes()})

    @classmethod
    def load_signed(cls, data: bytes, trust: TrustStore) -> Scorecard:
        if not isinstance(trust, TrustStore):
            raise InvalidArgument("a card is verified against a TrustStore")
        body, signature = split_document(data)
        doc = body_map(body, SIGNED_CARD_FIELDS, max_bin=16 * 1024 * 1024)
        if doc["v"] != CARD_FORMAT:
            raise MalformedMessage(f"unsupported signed card format {doc['v']}")
        trusted = trust.get(doc["kid"])
        if not trusted.roles & Role.SCORECARD:
            raise IssuerKeyRole("this issuer key may not sign scorecards")
        verify_document(trusted.key, TAG_CARD, body, signature)
        return cls.from_json(doc["card"].decode("utf-8"))


class _FlatCard(NamedTuple):
    """The card as the kernel reads it (see score_rows in _core.pyx)."""

    edges: npt.NDArray[np.float64]
    edge_off: npt.NDArray[np.int64]
    points: npt.NDArray[np.int32]
    point_off: npt.NDArray[np.int64]
    specials: npt.NDArray[np.float64]
    special_off: npt.NDArray[np.int64]
    best: npt.NDArray[np.int32]
    code_limit: npt.NDArray[np.float64]   # categorical: K, the unseen code; numeric: -1


def _flatten(card: Scorecard) -> _FlatCard:
    edges: list[float] = []
    points: list[int] = []
    specials: list[float] = []
    edge_off, point_off, special_off = [0], [0], [0]
    for f in card.features:
        edges += f.edges
        points += [*f.points, f.missing_points, *(p for _, p in f.specials)]
        specials += [c for c, _ in f.specials]
        edge_off.append(len(edges))
        point_off.append(len(points))
        special_off.append(len(specials))
    return _FlatCard(
        np.array(edges, dtype=np.float64), np.array(edge_off, dtype=np.int64),
        np.array(points, dtype=np.int32), np.array(point_off, dtype=np.int64),
        np.array(specials, dtype=np.float64), np.array(special_off, dtype=np.int64),
        np.array([f.best_points for f in card.features], dtype=np.int32),
        np.array([len(f.categories) if isinstance(f, CategoryBins) else -1
                  for f in card.features], dtype=np.float64))


def _sequence(name: str, values: object) -> tuple[Any, ...]:
    return tuple(_args.items(name, values))


def _as_matrix(X: npt.ArrayLike, n_features: int) -> npt.NDArray[np.floating[Any]]:
    try:
        array = np.asarray(X)
    except (TypeError, ValueError):     # ragged lists and the like
        raise InvalidArgument(f"X must be a (rows, {n_features}) numeric array") from None
    if array.dtype not in (np.float32, np.float64):
        if array.dtype.kind not in "iuf":
            raise InvalidArgument("X must be numeric")
        array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != n_features:
        raise InvalidArgument(f"X must be (rows, {n_features})")
    return array


# -- limits --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LimitBand:
    min_score: int
    limits: Mapping[Scene, int]   # offline credit limit per scene, minor units; 0 = not allowed

    def __post_init__(self) -> None:
        _args.integer("min_score", self.min_score, -2**53, 2**53)
        if not isinstance(self.limits, Mapping):
            raise InvalidArgument("a band's limits map each Scene to a limit")


@dataclass(frozen=True)
class LimitPolicy:
    """Score bands to offline credit limits per scene. A score below every
    band's min_score gets no credit at all."""

    bands: tuple[LimitBand, ...]

    def __post_init__(self) -> None:
        bands = _sequence("bands", self.bands)
        if not all(isinstance(b, LimitBand) for b in bands):
            raise InvalidArgument("a limit policy's bands are LimitBands")
        object.__setattr__(self, "bands", bands)
        scores = [b.min_score for b in self.bands]
        if not self.bands or scores != sorted(set(scores)):
            raise InvalidArgument("bands need strictly increasing min_score")
        for band in self.bands:
            for scene, value in band.limits.items():
                if not isinstance(scene, Scene):
                    raise InvalidArgument(f"limit keys are Scenes, not {scene!r}")
                if (not isinstance(value, int) or isinstance(value, bool)
                        or not 0 <= value <= 0xFFFF_FFFF):
                    raise InvalidArgument("limits are integer minor units in [0, 2**32)")

    def as_dict(self) -> dict[str, Any]:
        return {"bands": [{"min_score": b.min_score,
                           "limits": {s.name.lower(): v for s, v in sorted(b.limits.items())}}
                          for b in self.bands]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LimitPolicy:
        """From {"bands": [{"min_score": 560, "limits": {"bus": 3000, ...}}, ...]}."""
        if not isinstance(d, Mapping):
            raise MalformedMessage("a limit policy is a mapping with its bands")
        try:
            return cls(tuple(
                LimitBand(int(b["min_score"]),
                          {Scene[name.upper()]: int(v) for name, v in b["limits"].items()})
                for b in d["bands"]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(f"not a limit policy: {exc}") from None

    def limits(self, scores: npt.ArrayLike) -> dict[Scene, npt.NDArray[np.int64]]:
        """Per scene, the limit of each score (0 below the cut-off)."""
        s = _numbers("scores", scores, nan=False)
        band = np.searchsorted([b.min_score for b in self.bands], s, side="right") - 1
        out = {}
        for scene in Scene:
            table = np.array([0] + [b.limits.get(scene, 0) for b in self.bands], dtype=np.int64)
            out[scene] = table[band + 1]
        return out

    def terms(self, score: int) -> tuple[int, frozenset[Scene]]:
        """What a credential gets at this score: one offline limit (the band's
        largest) and the scenes with a non-zero limit. (0, {}) = no credit."""
        if not (_args.is_int(score) or (isinstance(score, (float, np.floating))
                                        and math.isfinite(score))):
            raise InvalidArgument(f"a score is one number, not {score!r:.80}")
        per_scene = {scene: int(v[0]) for scene, v in self.limits([score]).items()}
        scenes = frozenset(s for s, v in per_scene.items() if v > 0)
        return max(per_scene.values()), scenes

    def issue(self, issuer: IssuerKey, account: int, device_public: DevicePublicKey | bytes,
              score: int, not_before: int, not_after: int) -> Credential | None:
        """A credential on this policy's terms, or None below the cut-off."""
        if not isinstance(issuer, IssuerKey):
            raise InvalidKey("credentials are issued with an IssuerKey")
        limit, scenes = self.terms(score)
        if not scenes:
            return None
        return issuer.issue(account, device_public, limit, scenes, not_before, not_after)


# -- drift ---------------------------------------------------------------------------------

def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, bins: int = 10,
        epsilon: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected`, over
    quantile bins of `expected` (NaN in a bin of its own)."""
    e = _numbers("expected", expected, ndim=1).astype(np.float64)
    a = _numbers("actual", actual, ndim=1).astype(np.float64)
    bins = _args.integer("bins", bins, 1, MAX_PSI_BINS)
    epsilon = scorefit._finite(epsilon, "epsilon")
    if not 0 < epsilon < 1:
        raise InvalidArgument("epsilon is a share in (0, 1)")
    if len(e) == 0 or len(a) == 0:
        raise InvalidArgument("psi needs two non-empty samples")
    finite = e[~np.isnan(e)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if len(
        finite) else np.zeros(0)

    size = len(edges) + 2        # numeric bins, then NaN
    return _psi_of_bins(scorefit._bin_index(e, tuple(edges), ()),
                        scorefit._bin_index(a, tuple(edges), ()), size, epsilon)


def feature_psi(card: Scorecard, expected: npt.ArrayLike, actual: npt.ArrayLike
                ) -> dict[str, float]:
    """PSI per feature over the card's own bins (missing and specials included)."""
    if not isinstance(card, Scorecard):
        raise InvalidArgument("feature_psi compares samples over a Scorecard's bins")
    E = card.matrix(expected)
    A = card.matrix(actual)
    out = {}
    for f, feature in enumerate(card.features):
        codes = tuple(c for c, _ in feature.specials)
        size = len(feature.edges) + 2 + len(codes)   # the card's own bins
        out[feature.name] = _psi_of_bins(
            scorefit._bin_index(E[:, f].astype(np.float64), feature.edges, codes),
            scorefit._bin_index(A[:, f].astype(np.float64), feature.edges, codes), size, 1e-4)
    return out


def _psi_of_bins(expected: npt.NDArray[np.intp], actual: npt.NDArray[np.intp], size: int,
                 epsilon: float) -> float:
    """PSI of two samples given as bin indices in [0, size); empty shares count
    as epsilon."""
    pe = np.maximum(np.bincount(expected, minlength=size) / len(expected), epsilon)
    pa = np.maximum(np.bincount(actual, minlength=size) / len(actual), epsilon)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def auc(scores: npt.ArrayLike, bad: npt.ArrayLike) -> float:
    """Area under the ROC curve of `scores` ranking goods (bad == 0) above bads."""
    s = _numbers("scores", scores, ndim=1).astype(np.float64)
    y = _numbers("bad", bad, ndim=1, kinds="biuf").astype(bool)
    if np.isnan(s).any() or s.shape != y.shape:
        raise InvalidArgument("auc needs one non-NaN score per label")
    n_bad, n_good = int(y.sum()), int((~y).sum())
    if n_bad == 0 or n_good == 0:
        raise InvalidArgument("auc needs both goods and bads")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, ends - starts)
    good_rank_sum = ranks[~y].sum()
    return float((good_rank_sum - n_good * (n_good + 1) / 2) / (n_good * n_bad))


def _numbers(name: str, values: npt.ArrayLike, ndim: int | None = None,
             kinds: str = "iuf", nan: bool = True) -> npt.NDArray[Any]:
    """`values` as an array of numbers of `kinds` (with `ndim` dimensions if
    given; without NaN unless `nan`); InvalidArgument for text, objects,
    ragged lists or complex numbers."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be numbers") from None
    if array.dtype.kind not in kinds or (ndim is not None and array.ndim != ndim):
        raise InvalidArgument(f"{name} must be " + ("numbers" if ndim is None else
                                                      f"a {ndim}-D array of numbers"))
    if not nan and array.dtype.kind == "f" and np.isnan(array).any():
        raise InvalidArgument(f"{name} must not be NaN")
    return array
