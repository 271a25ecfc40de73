"""Grouping a categorical feature's categories into scorecard bins.

The categorical counterpart of the numeric binning in `qrpay.scorefit`, numpy
only, with the same WOE formula and smoothing (`scorefit._woe`). Labels are a
1-D array of dtype str or object; None, float NaN, pandas' NA/NaT and the empty
string "" are missing. Any other label is a category named by `str(label)`, so
1 and "1" in an object array are the same category; " " is a category, not
missing. Bytes labels are refused.

Steps, per feature:

1. Count rows and bads per category; missing rows go to a missing bin of
   their own, which is never merged and gets its own WOE.
2. Pool every category whose share of the non-missing rows is below
   `rare_share` into one bin (even a single rare category: its bin is then
   its own). A pooled bin that is still small merges like any other below.
3. Order the bins by WOE, worst first: ascending WOE = ln(good share / bad
   share), so the bin with the highest (smoothed) bad rate comes first.
4. Merge adjacent bins (in that order), always the least different pair
   first (the smallest 2x2 chi-square statistic of bads/goods), re-ordering
   by WOE after each merge:
   - while a bin holds less than `min_bin_share` of the non-missing rows
     (only pairs touching such a bin are candidates);
   - else while more than `max_bins` bins remain (any pair);
   - else while some adjacent pair is not significantly different, i.e. its
     chi-square(1) p-value is >= `alpha` (only such pairs are candidates).
   A single bin is never merged further.
5. WOE per bin and IV over the bins and the missing bin, as scorefit does:
   0.5 is added to each bin's goods and bads, the smoothed shares are taken
   over the bins that hold rows, WOE = ln(good share / bad share) and
   IV = sum (good share - bad share) * WOE.

The chi-square statistic is Pearson's, without Yates' correction:
N (b1 g2 - b2 g1)^2 / (n1 n2 B G); a pair with no bads or no goods between
them scores 0 (no evidence of a difference). Its p-value is the chi-square(1)
survival function, erfc(sqrt(x / 2)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay.errors import InvalidArgument
from qrpay import scorefit
from qrpay.scorefit import _check_binning, _finite, _woe

Floats = npt.NDArray[np.float64]
Codes = npt.NDArray[np.intp]

_MISSING_TYPES = ("NAType", "NaTType")     # pandas' missing markers, without importing pandas


@dataclass(frozen=True)
class CategoryGrouping:
    """A categorical feature's bins, worst first (ascending WOE).

    `groups[i]` lists the categories (sorted by name) of bin i, whose WOE,
    rows and bads are `woe[i]`, `rows[i]`, `bads[i]`. Missing rows are not in
    any bin: `missing_rows`, `missing_bads` and `missing_woe` (None when no
    value was missing at fit time). `pooled` lists the rare categories pooled
    in step 2; they all sit in one group (with others, if that bin merged).
    """

    groups: tuple[tuple[str, ...], ...]
    woe: tuple[float, ...]
    rows: tuple[int, ...]
    bads: tuple[int, ...]
    missing_woe: float | None
    iv: float
    pooled: tuple[str, ...]
    missing_rows: int = 0
    missing_bads: int = 0

    def bin_index(self, values: npt.ArrayLike) -> Codes:
        """Each row's bin: 0 .. len(groups) - 1 for a known category,
        len(groups) for a missing value, len(groups) + 1 for a category not
        seen at fit time. Same label rules as `group_categories`."""
        codes, names = _factorize(values)
        k = len(self.groups)
        lookup = {name: b for b, group in enumerate(self.groups) for name in group}
        per_name = np.array([lookup.get(name, k + 1) for name in names] + [k], dtype=np.intp)
        # codes == -1 (missing) picks the last entry, k.
        return per_name[codes]


def group_categories(values: npt.ArrayLike, bad: npt.ArrayLike, *, min_bin_share: float = 0.05,
                     max_bins: int = 8, rare_share: float = 0.01, alpha: float = 0.05
                     ) -> CategoryGrouping:
    """Group the categories in `values` by their bad rate (`bad`: 1 = bad, 0 = good).

    See the module docstring for the steps. Shares (`min_bin_share`,
    `rare_share`) are of the non-missing rows. Raises InvalidArgument when
    the lengths differ, `bad` is not 0/1 or lacks goods or bads, every value
    is missing, or a parameter is out of range.
    """
    labels = _bad_labels(bad)
    max_bins, min_bin_share = _check_binning(max_bins, min_bin_share)
    rare_share = _finite(rare_share, "rare_share")
    if not 0.0 <= rare_share <= 1.0:
        raise InvalidArgument("rare_share must be between 0 and 1")
    alpha = _finite(alpha, "alpha")
    if not 0.0 < alpha <= 1.0:
        raise InvalidArgument("alpha must be in (0, 1]")
    codes, names = _factorize(values)
    if len(codes) != len(labels):
        raise InvalidArgument("values and bad must have the same length")
    present = codes >= 0
    n_present = int(np.count_nonzero(present))
    if n_present == 0:
        raise InvalidArgument("every value is missing: there is nothing to group")
    cat_rows = np.bincount(codes[present], minlength=len(names)).astype(np.float64)
    cat_bads = np.bincount(codes[present], weights=labels[present], minlength=len(names))
    missing_rows = float(len(codes) - n_present)
    missing_bads = float(labels[~present].sum())

    # Step 2: pool the rare categories. Every name in `names` occurs at least once.
    rare = cat_rows < rare_share * n_present
    bins: list[_Group] = [_Group((names[i],), cat_rows[i], cat_bads[i])
                          for i in range(len(names)) if not rare[i]]
    pooled = tuple(names[i] for i in np.flatnonzero(rare))
    if pooled:
        bins.append(_Group(pooled, float(cat_rows[rare].sum()), float(cat_bads[rare].sum())))

    # Steps 3-4.
    bins = _merge(_ordered(bins), min_bin_share * n_present, max_bins, alpha)

    # Step 5: WOE over the bins and the missing bin together, as scorefit does.
    all_rows = np.array([b.rows for b in bins] + [missing_rows])
    all_bads = np.array([b.bads for b in bins] + [missing_bads])
    woe, iv = _woe(all_rows, all_bads, float(len(labels)), float(labels.sum()))
    return CategoryGrouping(
        groups=tuple(tuple(sorted(b.names)) for b in bins),
        woe=tuple(float(w) for w in woe[:-1]),
        rows=tuple(int(b.rows) for b in bins),
        bads=tuple(int(b.bads) for b in bins),
        missing_woe=float(woe[-1]) if missing_rows else None,
        iv=iv, pooled=pooled,
        missing_rows=int(missing_rows), missing_bads=int(missing_bads))


# -- labels ---------------------------------------------------------------------------------

def _bad_labels(bad: npt.ArrayLike) -> Floats:
    try:
        labels = np.asarray(bad)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad must be an array: {exc}") from None
    if labels.dtype.kind not in "biuf" or labels.ndim != 1:
        raise InvalidArgument("bad must be a 1-D array of 0 (good) and 1 (bad)")
    return scorefit.good_and_bad(labels, "bad")


def is_missing(label: Any) -> bool:
    """A category label that stands for no value: None, NaN, pandas' NA or
    NaT, or an empty string (scoring.CategoryBins reads labels the same way)."""
    if label is None or type(label).__name__ in _MISSING_TYPES:
        return True
    if isinstance(label, (float, np.floating)):
        return bool(math.isnan(label))
    return isinstance(label, str) and label == ""


def _factorize(values: npt.ArrayLike) -> tuple[Codes, list[str]]:
    """Codes into sorted category names, -1 for missing: one pass over the
    rows (a dict for object arrays, np.unique for str arrays)."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"values must be an array: {exc}") from None
    if array.ndim != 1:
        raise InvalidArgument("values must be a 1-D array of category labels")
    if array.dtype.kind == "U":
        uniq, inverse = np.unique(array, return_inverse=True)
        raw: list[Any] = uniq.tolist()
        raw_codes = inverse.reshape(-1).astype(np.intp)
    elif array.dtype.kind == "O":
        seen: dict[Any, int] = {}
        try:
            raw_codes = np.fromiter((seen.setdefault(v, len(seen)) for v in array.tolist()),
                                    dtype=np.intp, count=len(array))
        except TypeError:
            raise InvalidArgument("category labels must be hashable (str, int, ...)") from None
        raw = list(seen)
    else:
        raise InvalidArgument(f"values must hold str labels (dtype str or object), "
                              f"not dtype {array.dtype}")
    text: list[str | None] = []
    for label in raw:
        if isinstance(label, (bytes, np.bytes_)):
            raise InvalidArgument("category labels must be str, not bytes: decode them first")
        text.append(None if is_missing(label) else str(label))
    names = sorted({t for t in text if t is not None})
    position = {name: i for i, name in enumerate(names)}
    # Several raw labels may share a name (1 and "1"); missing ones map to -1.
    remap = np.array([-1 if t is None else position[t] for t in text], dtype=np.intp)
    return remap[raw_codes], names


# -- grouping -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Group:
    names: tuple[str, ...]
    rows: float
    bads: float

    @property
    def log_odds(self) -> float:
        # Same order as the smoothed WOE: ln((goods + .5) / (bads + .5)) plus a constant.
        return math.log((self.rows - self.bads + 0.5) / (self.bads + 0.5))


def _ordered(bins: list[_Group]) -> list[_Group]:
    """Ascending WOE (worst first); ties by first name, for a stable result."""
    return sorted(bins, key=lambda b: (b.log_odds, min(b.names)))


def chi_square(b1: float, n1: float, b2: float, n2: float) -> float:
    """Pearson's 2x2 chi-square statistic of (bads, goods) in two bins."""
    g1, g2 = n1 - b1, n2 - b2
    n, bads, goods = n1 + n2, b1 + b2, g1 + g2
    if n1 <= 0 or n2 <= 0 or bads <= 0 or goods <= 0:
        return 0.0
    return n * (b1 * g2 - b2 * g1) ** 2 / (n1 * n2 * bads * goods)


def chi_square_sf(statistic: float) -> float:
    """P(X >= statistic) for X ~ chi-square with 1 degree of freedom."""
    return math.erfc(math.sqrt(max(statistic, 0.0) / 2.0))


def _merge(bins: list[_Group], min_rows: float, max_bins: int, alpha: float) -> list[_Group]:
    bins = list(bins)
    while len(bins) > 1:
        stats = [chi_square(a.bads, a.rows, b.bads, b.rows) for a, b in zip(bins, bins[1:])]
        pairs = scorefit.must_merge([b.rows for b in bins], min_rows, max_bins)
        if not pairs:   # then the pairs not significantly different
            pairs = [p for p, s in enumerate(stats) if chi_square_sf(s) >= alpha]
            if not pairs:
                break
        i = min(pairs, key=lambda p: (stats[p], p))
        a, b = bins[i], bins[i + 1]
        bins[i:i + 2] = [_Group(a.names + b.names, a.rows + b.rows, a.bads + b.bads)]
        # The merged bin's smoothed WOE may step past a neighbour's by a hair.
        bins = _ordered(bins)
    return bins
