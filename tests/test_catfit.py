"""Grouping categories for a scorecard (catfit.py): planted effects and invariants."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrpay.catfit import CategoryGrouping, chi_square, chi_square_sf, group_categories
from qrpay.errors import InvalidArgument

# Six categories, equal shares; a/b and c/d share a true bad rate.
TRUE_RATE = {"a": 0.04, "b": 0.04, "c": 0.12, "d": 0.12, "e": 0.25, "f": 0.40}


def planted(n: int, seed: int) -> tuple[npt.NDArray[Any], npt.NDArray[np.int8]]:
    rng = np.random.default_rng(seed)
    names = np.array(sorted(TRUE_RATE))
    values = names[rng.integers(0, len(names), n)]
    rate = np.array([TRUE_RATE[v] for v in values])
    return values.astype(object), (rng.random(n) < rate).astype(np.int8)


def group_of(result: CategoryGrouping, name: str) -> int:
    return next(i for i, g in enumerate(result.groups) if name in g)


def check_invariants(result: CategoryGrouping, values: npt.NDArray[Any],
                     bad: npt.NDArray[Any], min_bin_share: float, max_bins: int) -> None:
    """What every grouping must satisfy, recomputed from the raw data."""
    missing = np.array([v is None or v == "" or (isinstance(v, float) and math.isnan(v))
                        for v in values], dtype=bool)
    present = [str(v) for v in values[~missing]]
    n_present = len(present)
    # Every category in exactly one group.
    listed = [name for g in result.groups for name in g]
    assert sorted(listed) == sorted(set(present))
    assert len(listed) == len(set(listed))
    # Counts per bin equal a direct count.
    for g, n_rows, n_bads in zip(result.groups, result.rows, result.bads):
        mask = np.isin(np.array(present, dtype=object), list(g))
        assert n_rows == int(mask.sum())
        assert n_bads == int(bad[~missing][mask].sum())
    assert sum(result.rows) == n_present
    # Missing counted apart.
    assert result.missing_rows == int(missing.sum())
    assert result.missing_bads == int(bad[missing].sum())
    assert (result.missing_woe is None) == (not missing.any())
    # Shares and bin count.
    assert len(result.groups) >= 1
    if len(result.groups) > 1:
        assert all(r >= min_bin_share * n_present - 1e-9 for r in result.rows)
        assert len(result.groups) <= max_bins
    # Worst first: WOE ascending.
    assert all(x <= y + 1e-12 for x, y in zip(result.woe, result.woe[1:]))
    # Pooled categories sit in one group.
    if result.pooled:
        assert len({group_of(result, p) for p in result.pooled}) == 1
    # WOE and IV recomputed with the documented smoothing (0.5 per count).
    rows = list(result.rows) + ([result.missing_rows] if result.missing_rows else [])
    bads = list(result.bads) + ([result.missing_bads] if result.missing_rows else [])
    goods_s = np.array([r - b + 0.5 for r, b in zip(rows, bads)])
    bads_s = np.array([b + 0.5 for b in bads])
    good_share, bad_share = goods_s / goods_s.sum(), bads_s / bads_s.sum()
    woe = np.log(good_share / bad_share)
    expected_woe = list(result.woe)
    if result.missing_woe is not None:
        expected_woe.append(result.missing_woe)
    np.testing.assert_allclose(expected_woe, woe, rtol=1e-12, atol=1e-12)
    assert result.iv == pytest.approx(float(np.sum((good_share - bad_share) * woe)),
                                      rel=1e-12, abs=1e-12)
    assert result.iv >= 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planted_effect_is_recovered(seed: int) -> None:
    values, bad = planted(20_000, seed)
    result = group_categories(values, bad)
    check_invariants(result, values, bad, 0.05, 8)
    assert len(result.groups) == 4
    assert group_of(result, "a") == group_of(result, "b")
    assert group_of(result, "c") == group_of(result, "d")
    order = [group_of(result, name) for name in ("f", "e", "c", "a")]
    assert order == [0, 1, 2, 3], result.groups     # worst (highest bad rate) first
    assert result.pooled == ()
    assert result.missing_woe is None


def test_str_dtype_and_object_dtype_agree() -> None:
    values, bad = planted(5_000, 7)
    assert group_categories(values.astype(str), bad) == group_categories(values, bad)


def test_rare_categories_are_pooled() -> None:
    values, bad = planted(20_000, 4)
    values = values.copy()
    values[:30] = "r1"          # 0.15% each, well below rare_share = 1%
    values[30:60] = "r2"
    values[60:70] = "r3"
    result = group_categories(values, bad)
    check_invariants(result, values, bad, 0.05, 8)
    assert result.pooled == ("r1", "r2", "r3")
    # Nothing is pooled when rare_share is 0.
    assert group_categories(values, bad, rare_share=0.0).pooled == ()


def test_pooled_bin_is_kept_when_large_and_different() -> None:
    rng = np.random.default_rng(5)
    # 40 rare categories (0.5% each) that are all very bad: 20% of rows together.
    rare = [f"r{i:02d}" for i in range(40)]
    values = np.array(["x"] * 8_000 + [r for r in rare for _ in range(50)], dtype=object)
    rate = np.where(np.char.startswith(values.astype(str), "r"), 0.6, 0.05)
    bad = (rng.random(len(values)) < rate).astype(int)
    result = group_categories(values, bad)
    assert result.pooled == tuple(rare)
    assert result.groups == (tuple(rare), ("x",))


def test_min_bin_share_is_respected() -> None:
    values, bad = planted(20_000, 6)
    values = values.copy()
    values[:800] = "small"      # 4%: above rare_share, below min_bin_share
    result = group_categories(values, bad, alpha=1.0)
    check_invariants(result, values, bad, 0.05, 8)
    owner = result.groups[group_of(result, "small")]
    assert len(owner) > 1
    # A stricter share leaves fewer bins.
    strict = group_categories(values, bad, min_bin_share=0.3, alpha=1.0)
    check_invariants(strict, values, bad, 0.3, 8)
    assert len(strict.groups) <= 3


def test_max_bins_is_respected() -> None:
    values, bad = planted(20_000, 8)
    for max_bins in (1, 2, 3):
        result = group_categories(values, bad, max_bins=max_bins, alpha=1.0)
        check_invariants(result, values, bad, 0.05, max_bins)
        assert len(result.groups) == max_bins


def exact(counts: dict[str, tuple[int, int]]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Rows with exactly (rows, bads) per category."""
    values = np.array([name for name, (n, _) in counts.items() for _ in range(n)], dtype=object)
    bad = np.array([int(i < b) for _, (n, b) in counts.items() for i in range(n)])
    return values, bad


def test_least_different_pair_merges_first() -> None:
    # Bad rates 10%, 12%, 30%, 32%, 60%: with room for 3 bins the two close
    # pairs merge and the lone 60% bin stays.
    values, bad = exact({"p": (1000, 100), "q": (1000, 120), "r": (1000, 300),
                         "s": (1000, 320), "t": (1000, 600)})
    result = group_categories(values, bad, max_bins=3, alpha=1.0)
    assert result.groups == (("t",), ("r", "s"), ("p", "q"))
    # From there, "least different" is the smaller chi-square statistic:
    # 31% vs 60% (2000 vs 1000 rows) beats 11% vs 31% (2000 vs 2000 rows).
    assert chi_square(620, 2000, 600, 1000) < chi_square(220, 2000, 620, 2000)
    two = group_categories(values, bad, max_bins=2, alpha=1.0)
    assert two.groups == (("r", "s", "t"), ("p", "q"))
    # A small bin merges with the neighbour it is least different from.
    values, bad = exact({"p": (1000, 100), "small": (40, 8), "t": (1000, 600)})
    result = group_categories(values, bad, alpha=1.0)
    assert result.groups == (("t",), ("p", "small"))


def test_alpha_one_keeps_every_distinct_category() -> None:
    # alpha = 1 merges only pairs with identical rates: six distinct ones stay apart.
    values, bad = planted(20_000, 9)
    assert len(group_categories(values, bad, alpha=1.0).groups) == 6


def test_missing_values_are_counted_apart() -> None:
    values, bad = planted(20_000, 10)
    values = values.copy()
    values[:1000] = None
    values[1000:2000] = float("nan")
    values[2000:3000] = ""
    bad[:3000] = 1              # all missing rows bad: the worst WOE of all
    result = group_categories(values, bad)
    check_invariants(result, values, bad, 0.05, 8)
    assert result.missing_rows == 3000
    assert result.missing_bads == 3000
    assert result.missing_woe is not None and result.missing_woe < min(result.woe)
    assert "" not in [n for g in result.groups for n in g]


def test_bin_index_maps_known_missing_and_unseen() -> None:
    values, bad = planted(20_000, 11)
    result = group_categories(values, bad)
    k = len(result.groups)
    probe = np.array(["a", "f", None, "", float("nan"), "never seen", "c"], dtype=object)
    got = result.bin_index(probe)
    assert got.tolist() == [group_of(result, "a"), group_of(result, "f"), k, k, k, k + 1,
                            group_of(result, "c")]
    np.testing.assert_array_equal(
        result.bin_index(values), [group_of(result, v) for v in values])


def test_labels_are_named_by_str() -> None:
    values = np.array([1, "1", 2, "2"] * 50, dtype=object)
    bad = np.array([0, 1] * 100)
    result = group_categories(values, bad)
    assert sorted(n for g in result.groups for n in g) == ["1", "2"]
    assert sum(result.rows) == 200


def test_chi_square_matches_hand_computation() -> None:
    # 2x2 table bads/goods: (10, 90) vs (30, 70); expected counts 20/80 each row.
    expected = sum((o - e) ** 2 / e for o, e in ((10, 20), (90, 80), (30, 20), (70, 80)))
    assert chi_square(10, 100, 30, 100) == pytest.approx(expected)
    assert chi_square(0, 10, 0, 20) == 0.0
    # Known chi-square(1) quantiles: 3.841459 -> 0.05, 6.634897 -> 0.01.
    assert chi_square_sf(3.841458820694124) == pytest.approx(0.05, rel=1e-9)
    assert chi_square_sf(6.6348966010212145) == pytest.approx(0.01, rel=1e-9)
    assert chi_square_sf(0.0) == 1.0


@pytest.mark.parametrize("call", [
    lambda v, b: group_categories(v[:-1], b),                        # lengths differ
    lambda v, b: group_categories(v, b * 2),                         # bad not 0/1
    lambda v, b: group_categories(v, np.zeros(len(b))),              # no bads
    lambda v, b: group_categories(v, b.astype(str)),                 # bad not numeric
    lambda v, b: group_categories(np.full(len(v), None, dtype=object), b),   # all missing
    lambda v, b: group_categories(np.arange(len(v)), b),             # numeric labels
    lambda v, b: group_categories(v.astype(str).astype(bytes), b),   # bytes labels
    lambda v, b: group_categories(v.reshape(-1, 2), b),              # 2-D
    lambda v, b: group_categories(v, b, min_bin_share=1.5),
    lambda v, b: group_categories(v, b, rare_share=-0.1),
    lambda v, b: group_categories(v, b, alpha=0.0),
    lambda v, b: group_categories(v, b, alpha=float("nan")),
    lambda v, b: group_categories(v, b, max_bins=0),
    lambda v, b: group_categories(v, b, max_bins=2.5),  # type: ignore[arg-type]
])
def test_bad_input_raises_invalid_argument(call: Any) -> None:
    values, bad = planted(200, 12)
    with pytest.raises(InvalidArgument):
        call(values, bad)


def test_unhashable_label_raises_invalid_argument() -> None:
    values = np.empty(4, dtype=object)
    values[:] = [["x"], "a", "b", "a"]
    with pytest.raises(InvalidArgument):
        group_categories(values, [0, 1, 0, 1])


LABELS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "", None,
                          float("nan")])


@given(rows=st.lists(st.tuples(LABELS, st.booleans()), min_size=2, max_size=300),
       min_bin_share=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]),
       max_bins=st.integers(1, 10), rare_share=st.sampled_from([0.0, 0.01, 0.1, 0.3]),
       alpha=st.sampled_from([1e-6, 0.05, 0.5, 1.0]))
def test_random_data_keeps_invariants(rows: list[tuple[Any, bool]], min_bin_share: float,
                                      max_bins: int, rare_share: float, alpha: float) -> None:
    values = np.empty(len(rows), dtype=object)
    values[:] = [v for v, _ in rows]
    bad = np.array([b for _, b in rows], dtype=int)
    present = [v for v in values if not (v is None or v == "" or isinstance(v, float))]
    if not present or bad.min() == bad.max():
        with pytest.raises(InvalidArgument):
            group_categories(values, bad, min_bin_share=min_bin_share, max_bins=max_bins,
                             rare_share=rare_share, alpha=alpha)
        return
    result = group_categories(values, bad, min_bin_share=min_bin_share, max_bins=max_bins,
                              rare_share=rare_share, alpha=alpha)
    check_invariants(result, values, bad, min_bin_share, max_bins)
    # Rare categories are exactly those below rare_share of the non-missing rows.
    counts = {name: present.count(name) for name in set(present)}
    assert result.pooled == tuple(sorted(n for n, c in counts.items()
                                         if c < rare_share * len(present)))
    # Where the loop stopped, no adjacent pair is left that alpha would merge.
    for i in range(len(result.groups) - 1):
        stat = chi_square(result.bads[i], result.rows[i], result.bads[i + 1], result.rows[i + 1])
        assert chi_square_sf(stat) < alpha
