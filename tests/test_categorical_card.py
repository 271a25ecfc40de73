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


def reference(card: Scorecard, frame: pd.DataFrame) -> np.ndarray:
    """Scores the plain way: each numeric feature by searchsorted over its
    edges (specials first, NaN missing), each categorical one by a dict of
    category -> points (missing and unseen apart)."""
    total = np.full(len(frame), card.base_points, dtype=np.int64)
    for feature in card.features:
        if isinstance(feature, CategoryBins):
            points = {c: p for g, p in zip(feature.groups, feature.group_points) for c in g}
            column = frame[feature.name].astype(object)
            missing = column.isna().to_numpy() | (column == "").to_numpy()
            got = column.map(lambda v: points.get(v, feature.unseen_points)).to_numpy()
            total += np.where(missing, feature.missing_points, got).astype(np.int64)
            continue
        x = frame[feature.name].to_numpy(dtype=np.float64)
        got = np.asarray(feature.points)[np.searchsorted(feature.edges, x, side="right")]
        for code, points in feature.specials:
            got = np.where(x == code, points, got)
        total += np.where(np.isnan(x), feature.missing_points, got)
    return total


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
    # explain: the same pass, the same scores; reasons name the category.
    scores, reasons = CARD.explain(frame[:2_000], k=3)
    assert np.array_equal(scores, expected[:2_000])
    named = CARD.reason_names(reasons, frame[:2_000])
    flat = [name for row in named for name in row]
    assert any(name.startswith("k") and " = " in name for name in flat)
    for row, names in enumerate(named):
        for name in names:
            if name.startswith("k"):
                feature, shown = name.split(" = ")
                value = frame[feature].iloc[row]
                if pd.isna(value) or value == "":
                    assert shown == "missing"
                elif shown != "unseen":
                    assert shown == value


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
    # In a float array a categorical column holds codes: anything else is unseen.
    got = card.score(np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [-1.0], [1.5], [np.nan]]))
    assert got.tolist() == [40, -10, -10, 5, -20, -20, -20, -5]
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
