"""Clearing and operators' statements (qrpay.clearing), on whichever backend is
active (the suite runs plain and with QRPAY_NO_EXTENSIONS=1):

- clear: equals a plain-Python reference on random rows, operators and
  schedules; gross adds up to the amounts charged, fee + net == gross, flagged
  money stays apart; exact past 2**53 and on a million rows;
- FeeSchedule: dict, JSON and msgpack round trips; every bad field is a typed
  error (InvalidArgument, or MalformedMessage for bytes);
- statements: sign/verify round trip; any tampered byte, another key or
  another tag is refused; a validly signed statement that does not add up is
  MalformedMessage; the CSV reads back to the same numbers and is checked
  against the signed bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrpay import clearing
from qrpay.clearing import (
    ClearingLine, FeeSchedule, OperatorClearing, Statement, check_invariants, clear, fee_of,
    sign_statement, statement_csv, verify_statement, verify_statement_csv,
)
from qrpay.credential import Scene
from qrpay.errors import BadSignature, InvalidArgument, InvalidKey, MalformedMessage
from qrpay.format import SCENE_COUNT, TAG_DENY, TAG_STATEMENT, U32_MAX
from qrpay.keys import IssuerKey, SettlementKey
from qrpay.wire import pack, sign_document

KEY = SettlementKey(bytes(range(64, 96)))
OTHER_KEY = SettlementKey(bytes(range(96, 128)))
SCHEDULE = FeeSchedule(3, {Scene.BUS: 150, Scene.FERRY: 200, Scene.METRO: 120,
                           Scene.CLINIC: 0, Scene.CANTEEN: 300, Scene.LIBRARY: 0,
                           Scene.RETAIL: 10_000}, 1_700_000_000)
FROM = 1_799_971_200  # 2027-01-15T00:00:00Z, the day of conftest's NOW
UNTIL = FROM + 86_400

operator_ids = st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,12}", fullmatch=True),
                        min_size=1, max_size=6, unique=True)
schedules = st.builds(
    FeeSchedule, st.integers(1, U32_MAX),
    st.lists(st.integers(0, 10_000), min_size=SCENE_COUNT, max_size=SCENE_COUNT).map(
        lambda bps: dict(zip(Scene, bps))),
    st.integers(0, U32_MAX))
amounts = st.one_of(st.integers(0, 1000), st.integers(0, U32_MAX), st.just(U32_MAX))


def _reference(amount: list[int], scene: list[int], operator: list[int], names: list[str],
               schedule: FeeSchedule, flagged: tuple[list[int], list[int], list[int]]
               ) -> list[OperatorClearing]:
    """The clearing as a row-by-row Python loop over plain ints."""
    cells: dict[tuple[int, int], list[int]] = {}
    for a, s, o in zip(amount, scene, operator):
        cell = cells.setdefault((o, s), [0, 0, 0, 0])
        cell[0] += 1
        cell[1] += a
    for a, s, o in zip(*flagged):
        cell = cells.setdefault((o, s), [0, 0, 0, 0])
        cell[2] += 1
        cell[3] += a
    result = []
    for o in sorted(range(len(names)), key=lambda i: names[i]):
        lines = []
        for s in range(SCENE_COUNT):
            if (o, s) in cells:
                count, gross, f_count, f_amount = cells[o, s]
                bps = schedule.bps[Scene(s)]
                fee = gross * bps // 10_000
                lines.append(ClearingLine(Scene(s), count, gross, bps, fee, gross - fee,
                                          f_count, f_amount))
        result.append(OperatorClearing(names[o], tuple(lines), sum(x.gross for x in lines),
                                       sum(x.fee for x in lines), sum(x.net for x in lines),
                                       sum(x.flagged_count for x in lines),
                                       sum(x.flagged_amount for x in lines)))
    return result


@st.composite
def periods(draw: st.DrawFn) -> tuple[Any, ...]:
    names = draw(operator_ids)
    rows = st.tuples(amounts, st.integers(0, SCENE_COUNT - 1), st.integers(0, len(names) - 1))
    charged = draw(st.lists(rows, max_size=120))
    flagged = draw(st.lists(rows, max_size=20))
    return names, charged, flagged, draw(schedules), draw(st.sampled_from([np.uint32, np.int64]))


def _columns(rows: list[tuple[int, int, int]]) -> tuple[list[int], list[int], list[int]]:
    a, s, o = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    return a, s, o


@given(periods())
def test_clear_equals_the_reference_and_keeps_the_invariants(period: tuple[Any, ...]) -> None:
    names, charged, flagged, schedule, dtype = period
    amount, scene, operator = _columns(charged)
    f_amount, f_scene, f_operator = _columns(flagged)
    result = clear(np.array(amount, dtype=dtype), np.array(scene, dtype=np.uint8),
                   np.array(operator, dtype=np.int64), names, schedule,
                   flagged_amount=np.array(f_amount, dtype=dtype),
                   flagged_scene=np.array(f_scene, dtype=np.uint8),
                   flagged_operator=np.array(f_operator, dtype=np.int32))
    assert result == _reference(amount, scene, operator, names, schedule,
                                (f_amount, f_scene, f_operator))
    check_invariants(sum(amount), result, total_flagged=sum(f_amount))
    assert [c.operator for c in result] == sorted(names)
    assert sum(c.count for c in result) == len(amount)
    for c in result:
        assert c.fee + c.net == c.gross
        for line in c.lines:
            assert line.fee + line.net == line.gross
            assert line.fee == fee_of(line.gross, schedule.bps[line.scene])
    # Flagged money is listed apart: the same charged rows clear the same
    # gross, fee and net with or without it.
    bare = clear(amount, scene, operator, names, schedule)
    assert [(c.gross, c.fee, c.net) for c in bare] == [(c.gross, c.fee, c.net) for c in result]


def test_operators_without_payments_get_an_empty_clearing_and_flagged_only_lines() -> None:
    result = clear([500, 700], [Scene.BUS, Scene.BUS], [1, 1], ["zz-ferry", "bus.co", "clinic"],
                   SCHEDULE, flagged_amount=[40], flagged_scene=[Scene.FERRY],
                   flagged_operator=[0])
    assert [c.operator for c in result] == ["bus.co", "clinic", "zz-ferry"]
    bus, clinic, ferry = result
    assert bus.lines == (ClearingLine(Scene.BUS, 2, 1200, 150, 18, 1182),)
    assert clinic == OperatorClearing("clinic", (), 0, 0, 0)
    assert ferry.lines == (ClearingLine(Scene.FERRY, 0, 0, 200, 0, 0, 1, 40),)
    assert (ferry.gross, ferry.flagged_count, ferry.flagged_amount) == (0, 1, 40)


def test_fee_rounds_down_per_line() -> None:
    # 1 % of 199 is 1.99: the fee is 1, in the operator's favour, and is taken
    # per (operator, scene) line, not per payment (which would make it 0).
    schedule = FeeSchedule(1, dict.fromkeys(Scene, 100), 0)
    (only,) = clear([99, 100], [0, 0], [0, 0], ["op"], schedule)
    assert (only.gross, only.fee, only.net) == (199, 1, 198)
    everything = FeeSchedule(1, dict.fromkeys(Scene, 10_000), 0)
    assert clear([7], [3], [0], ["op"], everything)[0].net == 0


def test_sums_are_exact_beyond_float_precision() -> None:
    # 3M odd amounts near 2**32 in one cell: the sum is about 1.3e16, past
    # 2**53, where a float64 sum would lose the low bits.
    n = 3_000_000
    amount = np.full(n, U32_MAX, dtype=np.uint32)
    amount[::7] = U32_MAX - 2
    expected = int(amount.astype(np.int64).sum())
    assert expected > 2**53
    (only,) = clear(amount, np.zeros(n, np.uint8), np.zeros(n, np.int64), ["op"], SCHEDULE)
    assert (only.count, only.gross) == (n, expected)
    assert only.fee == expected * 150 // 10_000


def test_a_million_rows() -> None:
    rng = np.random.default_rng(20270115)
    n, k = 1_000_000, 40
    amount = rng.integers(0, 2**32, n, dtype=np.uint32)
    scene = rng.integers(0, SCENE_COUNT, n, dtype=np.uint8)
    operator = rng.integers(0, k, n, dtype=np.int64)
    names = [f"op-{i:03d}" for i in range(k)]
    flagged = rng.random(n) < 0.01
    result = clear(amount[~flagged], scene[~flagged], operator[~flagged], names, SCHEDULE,
                   flagged_amount=amount[flagged], flagged_scene=scene[flagged],
                   flagged_operator=operator[flagged])
    # An independent exact computation: np.add.at over int64.
    cell = operator * SCENE_COUNT + scene
    gross = np.zeros(k * SCENE_COUNT, np.int64)
    np.add.at(gross, cell[~flagged], amount[~flagged].astype(np.int64))
    parked = np.zeros(k * SCENE_COUNT, np.int64)
    np.add.at(parked, cell[flagged], amount[flagged].astype(np.int64))
    total = int(amount[~flagged].astype(np.int64).sum())
    check_invariants(total, result, total_flagged=int(amount[flagged].astype(np.int64).sum()))
    for c in result:
        at = names.index(c.operator)
        for line in c.lines:
            assert line.gross == gross[at * SCENE_COUNT + line.scene]
            assert line.flagged_amount == parked[at * SCENE_COUNT + line.scene]
    assert sum(len(c.lines) for c in result) == k * SCENE_COUNT


@pytest.mark.parametrize("change", [
    {"amount": [-1]}, {"amount": [2**32]}, {"amount": [1.5]}, {"amount": [True]},
    {"amount": np.array([2**64 - 1], dtype=np.uint64)}, {"amount": [[1]]}, {"amount": 5},
    {"amount": ["1"]}, {"amount": None}, {"scene": [7]}, {"scene": [-1]},
    {"operator": [2]}, {"operator": [-1]}, {"amount": [1, 2]},
    {"operators": ["a", "a"]}, {"operators": ["=SUM(A1)"]}, {"operators": [""]},
    {"operators": ["x" * 65]}, {"operators": ["bus co"]}, {"operators": [7, "b"]},
    {"operators": "ab"}, {"schedule": {"BUS": 1}},
    {"flagged_amount": [1]}, {"flagged_amount": [1], "flagged_scene": [0]},
    {"flagged_amount": [1], "flagged_scene": [0], "flagged_operator": [5]},
])
def test_clear_refuses_bad_input(change: dict[str, Any]) -> None:
    args: dict[str, Any] = {"amount": [1], "scene": [0], "operator": [1],
                            "operators": ["a", "b"], "schedule": SCHEDULE}
    args.update(change)
    with pytest.raises(InvalidArgument):
        clear(**args)


def test_clear_refuses_rows_without_operators_and_takes_none() -> None:
    with pytest.raises(InvalidArgument):
        clear([1], [0], [0], [], SCHEDULE)
    assert clear([], [], [], [], SCHEDULE) == []
    assert clear(np.array([]), np.array([]), np.array([]), ["a"], SCHEDULE) == [
        OperatorClearing("a", (), 0, 0, 0)]


def test_totals_of_2_62_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2**62 takes 2**30 rows of 2**32: the limit is lowered to reach it.
    monkeypatch.setattr(clearing, "MAX_TOTAL", 1000)
    clear([999], [0], [0], ["a"], SCHEDULE)
    with pytest.raises(InvalidArgument):
        clear([500, 500], [0, 1], [0, 0], ["a"], SCHEDULE)
    with pytest.raises(InvalidArgument):
        clear([1], [0], [0], ["a"], SCHEDULE, flagged_amount=[1000], flagged_scene=[0],
              flagged_operator=[0])


def _cleared() -> list[OperatorClearing]:
    return clear([500, 700, 320, 9], [0, 0, 2, 6], [0, 0, 0, 1], ["bus.co", "shop"], SCHEDULE,
                 flagged_amount=[40, 60], flagged_scene=[1, 0], flagged_operator=[0, 0])


def _replace_line(c: OperatorClearing, **change: Any) -> OperatorClearing:
    return dataclasses.replace(c, lines=(dataclasses.replace(c.lines[0], **change),
                                         *c.lines[1:]))


@pytest.mark.parametrize("total, edit, flagged", [
    (1528, lambda cs: cs, 101),
    (1529, lambda cs: [dataclasses.replace(cs[0], gross=cs[0].gross + 1), cs[1]], None),
    (1529, lambda cs: [_replace_line(cs[0], fee=cs[0].lines[0].fee + 1), cs[1]], None),
    (1529, lambda cs: [_replace_line(cs[0], net=cs[0].lines[0].net - 1), cs[1]], None),
    (1529, lambda cs: [_replace_line(cs[0], fee_bps=200), cs[1]], None),
    (1529, lambda cs: [cs[0], cs[1], OperatorClearing("shop", (), 0, 0, 0)], None),
    (1529, lambda cs: [dataclasses.replace(cs[0], flagged_amount=1), cs[1]], None),
    (1529, lambda cs: [dataclasses.replace(cs[0], lines=cs[0].lines[::-1]), cs[1]], None),
    (1529, lambda cs: cs, 99),
    ("1529", lambda cs: cs, None),
])
def test_check_invariants_names_what_does_not_add_up(
        total: Any, edit: Callable[[list[OperatorClearing]], list[OperatorClearing]],
        flagged: int | None) -> None:
    cleared = _cleared()
    check_invariants(1529, cleared, total_flagged=100)
    with pytest.raises(InvalidArgument, match="invariants violated"):
        check_invariants(total, edit(cleared), total_flagged=flagged)


def test_check_invariants_takes_only_clearings() -> None:
    with pytest.raises(InvalidArgument):
        check_invariants(0, [object()])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        check_invariants(0, 5)  # type: ignore[arg-type]


# --- FeeSchedule ---------------------------------------------------------------------

@given(schedules)
def test_fee_schedule_round_trips(schedule: FeeSchedule) -> None:
    assert FeeSchedule.from_bytes(schedule.to_bytes()) == schedule
    assert FeeSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
    assert hash(FeeSchedule.from_dict(schedule.to_dict())) == hash(schedule)


def test_fee_schedule_dict_form_and_repr() -> None:
    assert SCHEDULE.to_dict() == {
        "version": 3, "effective_from": 1_700_000_000,
        "bps": {"BUS": 150, "FERRY": 200, "METRO": 120, "CLINIC": 0, "CANTEEN": 300,
                "LIBRARY": 0, "RETAIL": 10_000}}
    assert "BUS: 150" in repr(SCHEDULE)
    by_value = FeeSchedule(np.int64(3), {int(s): v for s, v in SCHEDULE.bps.items()},  # type: ignore[arg-type, misc]
                           1_700_000_000)
    assert by_value == SCHEDULE and type(by_value.version) is int
    with pytest.raises(TypeError):
        SCHEDULE.bps[Scene.BUS] = 0  # type: ignore[index]


def _all(bps: Any) -> dict[Any, Any]:
    return dict.fromkeys(Scene, bps)


def _bool_key() -> dict[Any, Any]:
    """Every scene, FERRY (value 1) keyed by True: a bool is not a scene."""
    bps: dict[Any, Any] = {s: 1 for s in Scene if s is not Scene.FERRY}
    bps[True] = 1
    return bps


@pytest.mark.parametrize("version, bps, effective_from", [
    (0, _all(1), 0), (-1, _all(1), 0), (True, _all(1), 0), (1.0, _all(1), 0),
    (2**32, _all(1), 0), (1, _all(1), -1), (1, _all(1), 2**32), (1, _all(1), None),
    (1, _all(-1), 0), (1, _all(10_001), 0), (1, _all(True), 0), (1, _all(1.5), 0),
    (1, _all("1"), 0), (1, {**_all(1), 7: 1}, 0), (1, {**_all(1), "BUS": 1}, 0),
    (1, {s: 1 for s in list(Scene)[:-1]}, 0), (1, {}, 0), (1, [1] * SCENE_COUNT, 0),
    (1, _bool_key(), 0),
])
def test_fee_schedule_refuses_bad_fields(version: Any, bps: Any, effective_from: Any) -> None:
    with pytest.raises(InvalidArgument):
        FeeSchedule(version, bps, effective_from)


@pytest.mark.parametrize("edit", [
    lambda d: {**d, "bps": {**d["bps"], "TRAM": 5}},
    lambda d: {**d, "bps": {**d["bps"], "bus": 5}},
    lambda d: {**d, "bps": {k: v for k, v in d["bps"].items() if k != "CLINIC"}},
    lambda d: {**d, "bps": {**d["bps"], "BUS": True}},
    lambda d: {**d, "bps": {**d["bps"], "BUS": -5}},
    lambda d: {**d, "bps": {**d["bps"], "BUS": 10_001}},
    lambda d: {**d, "bps": {**d["bps"], 0: 5}},
    lambda d: {**d, "bps": list(d["bps"].values())},
    lambda d: {**d, "version": "3"},
    lambda d: {**d, "extra": 1},
    lambda d: {k: v for k, v in d.items() if k != "effective_from"},
    lambda d: [d],
])
def test_fee_schedule_from_dict_is_strict(edit: Callable[[dict[str, Any]], Any]) -> None:
    with pytest.raises(InvalidArgument):
        FeeSchedule.from_dict(edit(SCHEDULE.to_dict()))


def _schedule_doc(**change: Any) -> bytes:
    doc: dict[str, Any] = {"v": 1, "version": 3, "effective_from": 1_700_000_000,
                           "bps": [SCHEDULE.bps[s] for s in Scene]}
    doc.update(change)
    return pack(doc)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"not msgpack", pack([1, 2]), _schedule_doc()[:-1], _schedule_doc() + b"\x00",
    _schedule_doc(v=2), _schedule_doc(version=0), _schedule_doc(version=True),
    _schedule_doc(bps=[1] * (SCENE_COUNT - 1)), _schedule_doc(bps=[1] * (SCENE_COUNT + 1)),
    _schedule_doc(bps=[True] * SCENE_COUNT), _schedule_doc(bps=[10_001] * SCENE_COUNT),
    _schedule_doc(bps=[-1] * SCENE_COUNT), _schedule_doc(bps=[1.0] * SCENE_COUNT),
    _schedule_doc(extra=1), _schedule_doc(effective_from=-1),
    # A valid schedule in another encoding: keys reordered, an int widened.
    pack({"version": 3, "v": 1, "effective_from": 1_700_000_000,
          "bps": [SCHEDULE.bps[s] for s in Scene]}),
    _schedule_doc().replace(b"\xa7version\x03", b"\xa7version\xcc\x03"),
    "text",
])
def test_fee_schedule_from_bytes_refuses_anything_else(data: Any) -> None:
    assert FeeSchedule.from_bytes(_schedule_doc()) == SCHEDULE
    with pytest.raises(MalformedMessage):
        FeeSchedule.from_bytes(data)


# --- Statements ----------------------------------------------------------------------

def _statement(at: int = 0, **change: Any) -> Statement:
    made = Statement.from_clearing(_cleared()[at], period=20270115, from_time=FROM,
                                   until=UNTIL, schedule=SCHEDULE, issued_at=UNTIL + 600)
    return dataclasses.replace(made, **change)


STATEMENT = _statement()
SIGNED = sign_statement(KEY, STATEMENT)


def test_statement_sign_verify_round_trip() -> None:
    verified = verify_statement(SIGNED, KEY.public)
    assert verified == dataclasses.replace(STATEMENT, kid=KEY.kid)
    assert (verified.gross, verified.fee, verified.net, verified.count) == (1520, 21, 1499, 3)
    assert (verified.flagged_count, verified.flagged_amount) == (2, 100)
    assert sign_statement(KEY, verified) == SIGNED  # deterministic, canonical
    secret = KEY.secret_bytes()
    assert secret not in SIGNED and secret.hex() not in repr(verified)
    assert secret.hex() not in repr(KEY) and secret.hex() not in statement_csv(verified)


@given(periods(), st.integers(0, U32_MAX - 2 * 86_400), st.integers(1, 86_400))
def test_any_cleared_statement_round_trips(period: tuple[Any, ...], start: int,
                                           length: int) -> None:
    names, charged, flagged, schedule, _dtype = period
    schedule = dataclasses.replace(schedule, effective_from=min(schedule.effective_from, start))
    result = clear(*_columns(charged), names, schedule, **dict(zip(
        ("flagged_amount", "flagged_scene", "flagged_operator"), _columns(flagged))))
    for c in result:
        made = Statement.from_clearing(c, period=start // 86_400, from_time=start,
                                       until=start + length, schedule=schedule,
                                       issued_at=start + length)
        signed = sign_statement(KEY, made)
        assert verify_statement(signed, KEY.public) == dataclasses.replace(made, kid=KEY.kid)
        assert verify_statement_csv(statement_csv(
            dataclasses.replace(made, kid=KEY.kid)), signed, KEY.public).operator == c.operator


def test_every_tampered_byte_is_refused() -> None:
    for at in range(len(SIGNED)):
        for flip in (0x01, 0x80, 0xFF):
            data = bytearray(SIGNED)
            data[at] ^= flip
            with pytest.raises((BadSignature, MalformedMessage)):
                verify_statement(bytes(data), KEY.public)
    for cut in range(len(SIGNED)):
        with pytest.raises((BadSignature, MalformedMessage)):
            verify_statement(SIGNED[:cut], KEY.public)
    with pytest.raises(MalformedMessage):
        verify_statement(SIGNED + b"\x00", KEY.public)


@given(st.data())
def test_random_corruption_is_refused(data: st.DataObject) -> None:
    corrupt = bytearray(SIGNED)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(SIGNED) - 1))
        corrupt[at] = data.draw(st.integers(0, 255))
    if bytes(corrupt) == SIGNED:
        return
    with pytest.raises((BadSignature, MalformedMessage)):
        verify_statement(bytes(corrupt), KEY.public)


def test_another_key_or_tag_is_refused() -> None:
    with pytest.raises(BadSignature):
        verify_statement(sign_statement(OTHER_KEY, STATEMENT), KEY.public)
    with pytest.raises(BadSignature):
        verify_statement(sign_document(KEY, TAG_DENY, _body()), KEY.public)
    with pytest.raises(InvalidKey):
        verify_statement(SIGNED, IssuerKey(bytes(32)).public)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        sign_statement(IssuerKey(bytes(32)), STATEMENT)  # type: ignore[arg-type]


def _body(**change: Any) -> dict[str, Any]:
    """The signed body of STATEMENT, as sign_statement writes it, changed."""
    s = STATEMENT
    body: dict[str, Any] = {
        "v": 1, "kid": KEY.kid, "period": s.period, "operator": s.operator,
        "from_time": s.from_time, "until": s.until, "schedule_version": s.schedule_version,
        "issued_at": s.issued_at,
        "lines": [[int(x.scene), x.count, x.gross, x.fee_bps, x.fee, x.net, x.flagged_count,
                   x.flagged_amount] for x in s.lines],
        "gross": s.gross, "fee": s.fee, "net": s.net, "flagged_count": s.flagged_count,
        "flagged_amount": s.flagged_amount,
    }
    body.update(change)
    return body


def _lines(edit: Callable[[list[list[Any]]], Any]) -> Any:
    lines = [list(x) for x in _body()["lines"]]
    return edit(lines)


def _set(row: int, col: int, value: Any) -> Callable[[list[list[Any]]], list[list[Any]]]:
    def edit(lines: list[list[Any]]) -> list[list[Any]]:
        lines[row][col] = value
        return lines
    return edit


@pytest.mark.parametrize("change", [
    {"gross": STATEMENT.gross + 1}, {"fee": STATEMENT.fee - 1}, {"net": STATEMENT.net + 1},
    {"flagged_count": 3}, {"flagged_amount": 99},
    {"lines": _lines(_set(0, 4, STATEMENT.lines[0].fee + 1))},       # fee off the rule
    {"lines": _lines(_set(0, 5, STATEMENT.lines[0].net - 1))},       # fee + net != gross
    {"lines": _lines(_set(0, 3, 10_001))},
    {"lines": _lines(_set(0, 0, 9))},                                # no such scene
    {"lines": _lines(_set(0, 1, True))},
    {"lines": _lines(_set(0, 2, -1))},
    {"lines": _lines(_set(0, 2, 2**62))},
    {"lines": _lines(_set(2, 1, 0))},               # 320 charged by no payment
    {"lines": _lines(lambda x: x[::-1])},
    {"lines": _lines(lambda x: x + x[:1])},
    {"lines": _lines(lambda x: [x[0][:7], *x[1:]])},
    {"lines": _lines(lambda x: [[*x[0], 0], *x[1:]])},
    {"lines": _lines(lambda x: x + [[3, 0, 0, 0, 0, 0, 0, 0]])},   # an empty line
    {"lines": "not a list"},
    {"kid": OTHER_KEY.kid}, {"kid": b"abc"}, {"v": 2}, {"period": -1}, {"period": True},
    {"from_time": UNTIL}, {"issued_at": UNTIL - 1}, {"until": 2**32},
    {"schedule_version": 0}, {"operator": "=HYPERLINK(1)"}, {"operator": ""},
    {"extra": 1}, {"gross": 1520.0},
])
def test_a_signed_statement_that_does_not_add_up_is_malformed(change: dict[str, Any]) -> None:
    verify_statement(sign_document(KEY, TAG_STATEMENT, _body()), KEY.public)
    signed = sign_document(KEY, TAG_STATEMENT, _body(**change))
    with pytest.raises(MalformedMessage):
        verify_statement(signed, KEY.public)


def test_a_missing_field_is_malformed() -> None:
    body = _body()
    del body["net"]
    with pytest.raises(MalformedMessage):
        verify_statement(sign_document(KEY, TAG_STATEMENT, body), KEY.public)


def _line(**change: Any) -> ClearingLine:
    return dataclasses.replace(STATEMENT.lines[0], **change)


@pytest.mark.parametrize("change", [
    {"gross": STATEMENT.gross + 1}, {"fee": 0}, {"from_time": UNTIL}, {"issued_at": FROM},
    {"operator": "-1+1"}, {"period": 2**32}, {"kid": b"\x00"}, {"schedule_version": 0},
    {"lines": list(STATEMENT.lines)},
    {"lines": (_line(scene=0), *STATEMENT.lines[1:])},
    {"lines": (_line(count=1.0), *STATEMENT.lines[1:])},
])
def test_a_statement_that_does_not_add_up_is_never_signed(change: dict[str, Any]) -> None:
    bad = dataclasses.replace(STATEMENT, **change)
    with pytest.raises(InvalidArgument):
        sign_statement(KEY, bad)
    with pytest.raises(InvalidArgument):
        statement_csv(bad)


def test_from_clearing_checks_its_inputs() -> None:
    later = dataclasses.replace(SCHEDULE, effective_from=FROM + 1)
    with pytest.raises(InvalidArgument, match="takes effect"):
        Statement.from_clearing(_cleared()[0], period=1, from_time=FROM, until=UNTIL,
                                schedule=later, issued_at=UNTIL)
    cheaper = FeeSchedule(4, {**SCHEDULE.bps, Scene.BUS: 100}, 0)
    with pytest.raises(InvalidArgument, match="not made under fee schedule 4"):
        Statement.from_clearing(_cleared()[0], period=1, from_time=FROM, until=UNTIL,
                                schedule=cheaper, issued_at=UNTIL)
    with pytest.raises(InvalidArgument):
        Statement.from_clearing(_cleared()[0], period=1, from_time=UNTIL, until=FROM,
                                schedule=SCHEDULE, issued_at=UNTIL)
    with pytest.raises(InvalidArgument):
        Statement.from_clearing(_cleared()[0], period=1, from_time=FROM, until=UNTIL,
                                schedule=SCHEDULE.to_dict(),  # type: ignore[arg-type]
                                issued_at=UNTIL)
    with pytest.raises(InvalidArgument):
        sign_statement(KEY, _cleared()[0])  # type: ignore[arg-type]


def test_an_operator_without_payments_gets_a_statement() -> None:
    (empty,) = clear([], [], [], ["quiet-ferry"], SCHEDULE)
    made = Statement.from_clearing(empty, period=1, from_time=FROM, until=UNTIL,
                                   schedule=SCHEDULE, issued_at=UNTIL)
    verified = verify_statement(sign_statement(KEY, made), KEY.public)
    assert verified.lines == () and verified.gross == verified.count == 0
    assert list(csv.reader(io.StringIO(statement_csv(verified))))[-1] == [
        "TOTAL", "0", "0", "", "0", "0", "0", "0"]


# --- CSV -----------------------------------------------------------------------------

def test_statement_csv_reads_back() -> None:
    verified = verify_statement(SIGNED, KEY.public)
    text = statement_csv(verified)
    assert text.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    head = {row[0]: row[1:] for row in rows[:9]}
    assert head["period"] == ["20270115"]
    assert head["operator"] == ["bus.co"]
    assert head["from_time"] == ["2027-01-15T00:00:00Z", str(FROM), "inclusive"]
    assert head["until"] == ["2027-01-16T00:00:00Z", str(UNTIL), "exclusive"]
    assert head["issued_at"] == ["2027-01-16T00:10:00Z", str(UNTIL + 600)]
    assert head["schedule_version"] == ["3"]
    assert head["settlement_kid"] == [KEY.kid.hex()]
    assert rows[9] == []
    assert rows[10] == ["scene", "count", "gross", "fee_bps", "fee", "net", "flagged_count",
                        "flagged_amount"]
    assert rows[11:] == [
        ["BUS", "2", "1200", "150", "18", "1182", "1", "60"],
        ["FERRY", "0", "0", "200", "0", "0", "1", "40"],
        ["METRO", "1", "320", "120", "3", "317", "0", "0"],
        ["TOTAL", "3", "1520", "", "21", "1499", "2", "100"],
    ]
    body = rows[11:-1]
    for row in body:
        assert int(row[4]) + int(row[5]) == int(row[2])
    for col in (1, 2, 4, 5, 6, 7):
        assert sum(int(r[col]) for r in body) == int(rows[-1][col])


def test_verify_statement_csv() -> None:
    text = statement_csv(verify_statement(SIGNED, KEY.public))
    assert verify_statement_csv(text, SIGNED, KEY.public).gross == 1520
    # Line endings are not content: a CSV saved with LF still matches.
    assert verify_statement_csv(text.replace("\r\n", "\n"), SIGNED, KEY.public).net == 1499
    for forged in (text.replace("1182", "1183"), text.replace("bus.co", "bus.cx"),
                   text + "\r\n", text.replace("TOTAL", "Total"), text[: text.rfind("TOTAL")],
                   statement_csv(STATEMENT)):  # unsigned: no kid
        with pytest.raises(BadSignature):
            verify_statement_csv(forged, SIGNED, KEY.public)
    with pytest.raises(BadSignature):
        verify_statement_csv(text, sign_statement(OTHER_KEY, STATEMENT), KEY.public)
    with pytest.raises(InvalidArgument):
        verify_statement_csv(text.encode(), SIGNED, KEY.public)  # type: ignore[arg-type]
