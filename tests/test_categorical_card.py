"""Categorical features in a card (issue 16, the card and the kernel): named
categories grouped into bins with missing and unseen bins, scored in the
compiled core as integer codes in the same pass as the numeric features,
equal to a plain numpy/pandas reference; inputs as a DataFrame, a mapping of
columns or codes; reasons that name the category; old numeric cards
unchanged."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from qrpay import IssuerKey, TrustStore
from qrpay.errors import InvalidArgument, MalformedMessage
from qrpay.scoring import CategoryBins, FeatureBins, Scorecard, feature_psi
from qrpay.trust import Role

HOUSING = CategoryBins("housing", (("own",), ("rent", "council"), ("with parents",)),
                       (40, -10, 5), missing_points=-5, unseen_points=-20)


def numeric(i: int) -> FeatureBins:
    return FeatureBins(f"n{i}", (10.0 * i, 10.0 * i + 25.0, 10.0 * i + 60.0),
                       (30 - i, 12, 0, -9 + i), missing_points=-3 - i,
                       specials=((-1.0, 7),) if i % 3 == 0 else ())


def category(i: int) -> CategoryBins:
    names = [f"c{i}-{j}" for j in range(3 + i)]
    groups = tuple(tuple(names[j::2]) for j in range(2)) + ((f"rare{i}",),)
    return CategoryBins(f"k{i}", groups, (15 + i, -4 * i, -30), missing_points=-2 * i,
                        unseen_points=-35 - i)


CARD = Scorecard(tuple(numeric(i) for i in range(8)) + tuple(category(i) for i in range(6)),
                 base_points=500)


def feature_points(card: Scorecard, frame: pd.DataFrame) -> np.ndarray:
    """Each row's points per feature, the plain way: each numeric feature by
    searchsorted over its edges (specials first, NaN missing), each
    categorical one by a dict of category -> points (missing and unseen
    apart)."""
    out = np.empty((len(frame), len(card.features)), dtype=np.int64)
    for f, feature in enumerate(card.features):
        if isinstance(feature, CategoryBins):
            points = {c: p for g, p in zip(feature.groups, feature.group_points) for c in g}
            column = frame[feature.name].astype(object)
            missing = column.isna().to_numpy() | (column == "").to_numpy()
            got = column.map(lambda v: points.get(v, feature.unseen_points)).to_numpy()
            out[:, f] = np.where(missing, feature.missing_points, got)
            continue
        x = frame[feature.name].to_numpy(dtype=np.float64)
        got = np.asarray(feature.points)[np.searchsorted(feature.edges, x, side="right")]
        for code, points in feature.specials:
            got = np.where(x == code, points, got)
        out[:, f] = np.where(np.isnan(x), feature.missing_points, got)
    return out


def reference(card: Scorecard, frame: pd.DataFrame) -> np.ndarray:
    """Scores the plain way: the base plus each feature's points."""
    return card.base_points + feature_points(card, frame).sum(axis=1)


def reference_reasons(card: Scorecard, frame: pd.DataFrame, k: int) -> np.ndarray:
    """Reasons the plain way: per row, the k features that lost the most
    points against their best bin, most first, the earlier feature first on
    ties; -1 where fewer than k lost any."""
    best = np.array([f.best_points for f in card.features], dtype=np.int64)
    loss = best[None, :] - feature_points(card, frame)
    order = np.argsort(-loss, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(loss, order, axis=1) > 0, order, -1)


def city(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame: dict[str, object] = {}
    for i in range(8):
        x = rng.normal(10 * i + 30, 30, n)
        x[rng.random(n) < 0.05] = np.nan
        x[rng.random(n) < 0.02] = -1.0
        frame[f"n{i}"] = x
    for i in range(6):
        feature = CARD.features[8 + i]
        assert isinstance(feature, CategoryBins)
        pool = np.array([*feature.categories, "never-seen", None, ""], dtype=object)
        weights = np.r_[np.full(len(feature.categories), 1.0), 0.05, 0.1, 0.02]
        values = pool[rng.choice(len(pool), n, p=weights / weights.sum())]
        frame[f"k{i}"] = pd.Categorical(values) if i % 2 else values
    return pd.DataFrame(frame)


def test_a_million_rows_of_8_numeric_and_6_categorical_features_equal_the_reference() -> None:
    frame = city(1_000_000)
    expected = reference(CARD, frame)
    assert np.array_equal(CARD.score(frame, threads=2), expected)
    # The same rows as a mapping of columns, and as codes in a float array.
    columns = {name: frame[name].to_numpy() for name in frame.columns}
    assert np.array_equal(CARD.score(columns), expected)
    codes = CARD.matrix(frame)
    assert np.array_equal(CARD.score(codes), expected)
    # explain: the same pass, the same scores, and the reference's reasons
    # on every row; the names give the category (checked on the first 20,000).
    scores, reasons = CARD.explain(frame, k=3, threads=2)
    assert np.array_equal(scores, expected)
    assert np.array_equal(reasons, reference_reasons(CARD, frame, 3))
    assert np.array_equal(CARD.explain(codes, k=3)[1], reasons)
    head = frame[:20_000]
    named = CARD.reason_names(reasons[:20_000], head)
    assert sum(" = " in name for row in named for name in row) > 1_000
    for row, names in enumerate(named):
        assert [n.split(" = ")[0] for n in names] == [
            CARD.feature_names[i] for i in reasons[row] if i >= 0]
        for name in names:
            if name.startswith("k"):
                feature, shown = name.split(" = ")
                value = head[feature].iloc[row]
                categories = CARD.features[CARD.feature_names.index(feature)].categories
                if pd.isna(value) or value == "":
                    assert shown == "missing"
                else:
                    assert shown == (value if value in categories else "unseen")


def test_codes_missing_unseen_and_what_a_float_code_means() -> None:
    # Code order: group by group, names sorted within; one edge per group.
    assert HOUSING.categories == ("own", "council", "rent", "with parents")
    assert HOUSING.edges == (0.5, 2.5, 3.5) and HOUSING.points == (40, -10, 5, -20)
    codes = HOUSING.codes(np.array(["rent", None, "castle", "", float("nan"), "own"],
                                   dtype=object))
    assert codes[0] == 2 and codes[2] == 4 and codes[5] == 0
    assert np.isnan(codes[[1, 3, 4]]).all()
    assert np.isnan(HOUSING.codes(pd.Series(["own", pd.NA], dtype="string")))[1]
    card = Scorecard((HOUSING,), base_points=0)
    # In a float array a categorical column holds codes: anything else is
    # unseen (the kernel checks every code as it scores it), float32 too.
    codes_in = [0.0, 1.0, 2.0, 3.0, 4.0, -1.0, 1.5, np.nan, -0.5, 0.5, 3.5, 5.0, -0.0,
                np.inf, -np.inf, 1e300, 2.0 + 1e-15, 2**53]
    want = [40, -10, -10, 5, -20, -20, -20, -5, -20, -20, -20, -20, 40,
            -20, -20, -20, -20, -20]
    for dtype in (np.float64, np.float32):
        with np.errstate(over="ignore"):   # 1e300 is inf in float32
            X = np.array(codes_in, dtype=dtype)[:, None]
        if dtype == np.float32:   # 2.0 + 1e-15 is 2.0 in float32
            want32 = [w if c != 2.0 + 1e-15 else -10 for c, w in zip(codes_in, want)]
            assert card.score(X).tolist() == want32
        else:
            assert card.score(X).tolist() == want
    # A card of more than 8 groups takes the row kernel: the same rule.
    wide = CategoryBins("wide", tuple((f"g{j}",) for j in range(10)), tuple(range(10)),
                        missing_points=-5, unseen_points=-20)
    got = Scorecard((wide,), base_points=0).score(
        np.array([[0.0], [9.0], [10.0], [11.0], [4.5], [-1.0], [np.nan]]))
    assert got.tolist() == [0, 9, -20, -20, -20, -20, -5]
    assert [HOUSING.category_of(c) for c in (2.0, 2.5, 4.0, -1.0, np.inf, np.nan)] == [
        "rent", "unseen", "unseen", "unseen", "unseen", "missing"]
    assert card.score(pd.DataFrame({"housing": ["own", "rent", "igloo", None]})).tolist() == [
        40, -10, -20, -5]


def test_card_documents_round_trip_and_old_cards_are_unchanged() -> None:
    for again in (Scorecard.from_json(CARD.to_json()), Scorecard.from_msgpack(CARD.to_msgpack())):
        assert again == CARD and again.card_id == CARD.card_id
    issuer = IssuerKey(bytes(range(32)))
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.SCORECARD)
    assert Scorecard.load_signed(CARD.sign(issuer), trust) == CARD
    # A numeric feature's document has no kind: an old card keeps its bytes and id.
    old = Scorecard((numeric(1),), base_points=500)
    assert "kind" not in json.loads(old.to_json())["features"][0]
    assert json.loads(CARD.to_json())["features"][-1]["kind"] == "categorical"
    broken = json.loads(CARD.to_json())
    del broken["features"][-1]["unseen_points"]
    with pytest.raises(MalformedMessage):
        Scorecard.from_dict(broken)


def test_bad_categorical_features_are_refused() -> None:
    for groups, points in (((), ()), ((("a",), ("a",)), (1, 2)), ((("a",), ()), (1, 2)),
                           ((("a",),), (1, 2)), (((1,),), (1,)), ((("",),), (1,))):
        with pytest.raises(InvalidArgument):
            CategoryBins("f", groups, points, 0, 0)   # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        CategoryBins("f", (("a",),), (10**7,), 0, 0)
    with pytest.raises(InvalidArgument):
        Scorecard((HOUSING,), 0).score(pd.DataFrame({"tenure": ["own"]}))


def test_psi_over_the_cards_own_categorical_bins() -> None:
    before, after = city(20_000, seed=1), city(20_000, seed=2)
    same = feature_psi(CARD, before, before)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in same.values())
    shifted = after.copy()
    shifted["k0"] = np.where(np.arange(len(after)) % 2 == 0, "c0-0", after["k0"])
    psi = feature_psi(CARD, before, shifted)
    assert psi["k0"] > 0.1 and psi["k1"] < 0.01


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_categorical_cards_score_as_the_reference(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1,
                               max_size=12, unique=True))
    cut = sorted(data.draw(st.sets(st.integers(1, len(names) - 1), max_size=len(names) - 1))
                 ) if len(names) > 1 else []
    bounds = [0, *cut, len(names)]
    groups = tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:]))
    points = st.integers(-1000, 1000)
    feature = CategoryBins("f", groups, tuple(data.draw(points) for _ in groups),
                           data.draw(points), data.draw(points))
    card = Scorecard((feature, numeric(2)), base_points=data.draw(points))
    values = data.draw(st.lists(st.sampled_from([*names, "zz-unseen", None, ""]), min_size=1,
                                max_size=50))
    frame = pd.DataFrame({"f": np.array(values, dtype=object),
                          "n2": np.linspace(0, 100, len(values))})
    assert np.array_equal(card.score(frame), reference(card, frame))


def test_fit_groups_the_categories_of_a_frame_and_beats_the_numbers_alone() -> None:
    from qrpay.scoring import auc
    from qrpay.synthetic_categories import EFFECTS, categorical_histories
    train, test = categorical_histories(40_000, seed=1), categorical_histories(40_000, seed=2)
    frame = train.to_frame()
    card = Scorecard.fit(frame, train.y, list(frame.columns))
    assert card.feature_names == tuple(frame.columns)   # the order asked for
    numbers = Scorecard.fit(train.X, train.y, list(train.numeric_features))
    both = auc(card.score(test.to_frame()), test.y)
    assert both > auc(numbers.score(test.X), test.y) + 0.015
    insurance = next(f for f in card.features if f.name == "insurance_status")
    assert isinstance(insurance, CategoryBins)
    # Bins in the order of the true effect: more log-odds of default, fewer points.
    truth = EFFECTS["insurance_status"]
    for a, pa in zip(insurance.groups, insurance.group_points):
        for b, pb in zip(insurance.groups, insurance.group_points):
            if max(truth[c] for c in a) < min(truth[c] for c in b) - 0.3:
                assert pa > pb, (a, b)
    assert ("employer", "voluntary") in insurance.groups        # equal effects, one bin
    # An unseen category gets no more than the worst bin (or the missing one).
    assert insurance.unseen_points == min(*insurance.group_points, insurance.missing_points)
    # The same fit from a mapping of plain arrays.
    columns = {name: (frame[name].astype(object).where(frame[name].notna(), None).to_numpy()
                      if isinstance(frame[name].dtype, pd.CategoricalDtype)
                      else frame[name].to_numpy()) for name in frame.columns}
    assert Scorecard.fit(columns, train.y, list(frame.columns)) == card
    with pytest.raises(InvalidArgument):
        Scorecard.fit(frame, train.y, ["no such column"])
