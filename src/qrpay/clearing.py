"""Clearing: what each operator is owed for a period, and its signed statement.

Each gateway belongs to an operator (a bus company, a ferry line, a clinic).
`clear` groups a period's charged payments by (operator, scene), takes the
city's fee from a versioned FeeSchedule and returns per operator the gross,
the fee and the net payable. Payments flagged and not charged (double spends,
clones, invalid tokens) are listed apart on the same lines, never in gross,
fee or net.

Amounts are integers in minor currency units (fen, cents), never floats. The
fee rule is exact: per (operator, scene) line, fee = gross * bps // 10_000,
rounded down (in the operator's favour), and net = gross - fee; an operator's
fee and net are the sums of its lines', so fee + net == gross in every line
and every total, and each line can be recomputed from its own gross and bps.

A Statement is one operator's clearing for one period, signed by the
SettlementKey as a msgpack document (TAG_STATEMENT) that the operator verifies
offline with the settlement public key. `statement_csv` renders it for an
accountant; the signed msgpack is what is verified, and `verify_statement_csv`
checks that a CSV says exactly what the signed statement says.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay.credential import Scene, as_scene
from qrpay.errors import BadSignature, InvalidArgument, InvalidKey, MalformedMessage
from qrpay.format import KID_LEN, SCENE_COUNT, TAG_STATEMENT, U32_MAX
from qrpay.keys import SettlementKey, SettlementPublicKey
from qrpay.wire import body_map, pack, sign_document, split_document, verify_document

__all__ = [
    "BPS_DENOMINATOR", "CSV_COLUMNS", "MAX_TOTAL", "OPERATOR_ID", "ClearingLine", "FeeSchedule", "OperatorClearing",
    "Statement", "check_invariants", "clear", "fee_of", "sign_statement", "statement_csv",
    "verify_statement", "verify_statement_csv",
]

FORMAT_VERSION = 1
BPS_DENOMINATOR = 10_000
MAX_TOTAL = 2**62
"""Every count and amount, per line and in total, is below this: exact in
int64 with room to add two of them."""
MAX_ROWS = 2**37
"""Rows per call at most: keeps the float64 sums in `_sums` exact."""
# An operator id is an identifier, not a display name: ASCII, and never
# starting with = + - @, which a spreadsheet opening the CSV runs as a formula.
OPERATOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_LINE_LEN = 8  # scene, count, gross, fee_bps, fee, net, flagged_count, flagged_amount

_SCHEDULE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "version": int, "effective_from": int, "bps": list,
}
_STATEMENT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int, "kid": bytes, "period": int, "operator": str, "from_time": int, "until": int,
    "schedule_version": int, "issued_at": int, "lines": list, "gross": int, "fee": int,
    "net": int, "flagged_count": int, "flagged_amount": int,
}
CSV_COLUMNS = ("scene", "count", "gross", "fee_bps", "fee", "net", "flagged_count",
               "flagged_amount")


def fee_of(gross: int, bps: int) -> int:
    """The city's fee on one line: rounded down, so never more than bps says."""
    return gross * bps // BPS_DENOMINATOR


@dataclass(frozen=True)
class FeeSchedule:
    """The city's fee per scene in basis points (100 bps = 1 %), from
    `effective_from` (Unix seconds) on; `version` (1 to 2**32 - 1) names it in
    statements.

    Every Scene must be listed, a free one as 0: a scene missing from a file
    is refused (InvalidArgument), never read as a silent 0 bps or a default.
    Keys are Scene members (or their int values); `to_dict` / `from_dict` use
    the Scene names ("BUS"), for JSON and TOML files.
    """

    version: int
    bps: Mapping[Scene, int]
    effective_from: int

    def __post_init__(self) -> None:
        version = _args.integer("version", self.version, 1, U32_MAX)
        effective_from = _args.integer("effective_from", self.effective_from, 0, U32_MAX)
        if not isinstance(self.bps, Mapping):
            raise InvalidArgument("bps maps every Scene to basis points")
        given: dict[Scene, int] = {}
        for key, value in self.bps.items():
            scene = as_scene(key)
            if scene in given:
                raise InvalidArgument(f"scene {scene.name} is listed twice")
            given[scene] = _args.integer(f"bps of {scene.name}", value, 0, BPS_DENOMINATOR)
        missing = [s.name for s in Scene if s not in given]
        if missing:
            raise InvalidArgument(f"the fee schedule lists no bps for {', '.join(missing)} "
                                  "(every scene is listed, 0 for no fee)")
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "effective_from", effective_from)
        object.__setattr__(self, "bps", MappingProxyType({s: given[s] for s in Scene}))

    def __hash__(self) -> int:  # a read-only mapping is not hashable itself
        return hash((self.version, self.effective_from, tuple(self.bps.items())))

    def __repr__(self) -> str:
        bps = ", ".join(f"{s.name}: {v}" for s, v in self.bps.items())
        return (f"FeeSchedule(version={self.version}, bps={{{bps}}}, "
                f"effective_from={self.effective_from})")

    def to_dict(self) -> dict[str, Any]:
        """{"version", "effective_from", "bps": {scene name: bps}}: JSON-able."""
        return {"version": self.version, "effective_from": self.effective_from,
                "bps": {s.name: self.bps[s] for s in Scene}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeeSchedule:
        """The inverse of to_dict, strictly: exactly its keys, Scene names as
        written ("BUS"), integers that are not bools; else InvalidArgument."""
        if not isinstance(data, Mapping) or set(data) != {"version", "effective_from", "bps"}:
            raise InvalidArgument("a fee schedule is {version, effective_from, bps}")
        bps = data["bps"]
        if not isinstance(bps, Mapping):
            raise InvalidArgument("bps maps scene names to basis points")
        by_scene: dict[Scene, int] = {}
        for name, value in bps.items():
            if not isinstance(name, str) or name not in Scene.__members__:
                raise InvalidArgument(f"unknown scene name {name!r:.80}")
            by_scene[Scene[name]] = value
        return cls(data["version"], by_scene, data["effective_from"])

    def to_bytes(self) -> bytes:
        """Canonical msgpack: {"v", "version", "effective_from", "bps": [bps
        by Scene value]}. One schedule has exactly one encoding."""
        return pack({"v": FORMAT_VERSION, "version": self.version,
                     "effective_from": self.effective_from,
                     "bps": [self.bps[s] for s in Scene]})

    @classmethod
    def from_bytes(cls, data: bytes) -> FeeSchedule:
        """The inverse of to_bytes; anything else, a non-canonical encoding
        of a valid schedule included, is MalformedMessage."""
        doc = body_map(data, _SCHEDULE_FIELDS, max_array=SCENE_COUNT, max_map=4, max_str=16)
        if doc["v"] != FORMAT_VERSION:
            raise MalformedMessage(f"unsupported fee schedule format {doc['v']}")
        values = doc["bps"]
        if len(values) != SCENE_COUNT or not all(_exact_int(v) for v in values):
            raise MalformedMessage(f"fee schedule bps are {SCENE_COUNT} integers")
        try:
            schedule = cls(doc["version"], dict(zip(Scene, values)), doc["effective_from"])
        except InvalidArgument as exc:
            raise MalformedMessage(f"not a valid fee schedule: {exc}") from None
        if schedule.to_bytes() != bytes(data):
            raise MalformedMessage("a fee schedule in a non-canonical encoding")
        return schedule


@dataclass(frozen=True)
class ClearingLine:
    """One scene of one operator's period. `count` and `gross` are the
    charged payments; fee = gross * fee_bps // 10_000, net = gross - fee.
    `flagged_count` / `flagged_amount` are payments there that were flagged
    and not charged: listed for follow-up, never part of gross, fee or net."""

    scene: Scene
    count: int
    gross: int
    fee_bps: int
    fee: int
    net: int
    flagged_count: int = 0
    flagged_amount: int = 0


@dataclass(frozen=True)
class OperatorClearing:
    """One operator's period: its lines by scene value (only scenes with a
    charged or a flagged payment) and their sums."""

    operator: str
    lines: tuple[ClearingLine, ...]
    gross: int
    fee: int
    net: int
    flagged_count: int = 0
    flagged_amount: int = 0

    @property
    def count(self) -> int:
        return sum(line.count for line in self.lines)


def clear(amount: npt.ArrayLike, scene: npt.ArrayLike, operator: npt.ArrayLike,
          operators: Sequence[str], schedule: FeeSchedule, *,
          flagged_amount: npt.ArrayLike | None = None,
          flagged_scene: npt.ArrayLike | None = None,
          flagged_operator: npt.ArrayLike | None = None) -> list[OperatorClearing]:
    """Clear one period: per operator, what it is owed.

    One row per charged payment: `amount` (0 to 2**32 - 1 minor units),
    `scene` (a Scene value) and `operator` (an index into `operators`, the
    operator ids), as 1-D integer arrays of one length. The flagged arrays,
    all three or none, are the period's payments that were not charged.

    Returns one OperatorClearing per operator id, sorted by id (code point
    order), every operator included: one with no payments gets a clearing
    with no lines and zeros, so a missing statement is always an error, never
    "nothing happened".
    InvalidArgument for any input out of range or a total of 2**62 or more.
    """
    if not isinstance(schedule, FeeSchedule):
        raise InvalidArgument("clearing takes a FeeSchedule")
    names = _operator_ids(operators)
    cells = len(names) * SCENE_COUNT
    count, gross = _sums(*_rows("", amount, scene, operator, len(names)), cells)
    flagged = (flagged_amount, flagged_scene, flagged_operator)
    if all(column is None for column in flagged):
        flagged_count, flagged_sum = [0] * cells, [0] * cells
    elif any(column is None for column in flagged):
        raise InvalidArgument("flagged_amount, flagged_scene and flagged_operator come together")
    else:
        flagged_count, flagged_sum = _sums(*_rows("flagged_", *flagged, len(names)), cells)
    if sum(gross) >= MAX_TOTAL or sum(flagged_sum) >= MAX_TOTAL:
        raise InvalidArgument("a period's total must be below 2**62 minor units")
    result = []
    # A loop over (operator, scene) cells, not rows: the rows were summed above.
    for at in sorted(range(len(names)), key=names.__getitem__):
        lines = []
        for s in Scene:
            cell = at * SCENE_COUNT + s
            if count[cell] or flagged_count[cell]:
                fee = fee_of(gross[cell], schedule.bps[s])
                lines.append(ClearingLine(s, count[cell], gross[cell], schedule.bps[s], fee,
                                          gross[cell] - fee, flagged_count[cell],
                                          flagged_sum[cell]))
        result.append(OperatorClearing(
            names[at], tuple(lines), sum(x.gross for x in lines), sum(x.fee for x in lines),
            sum(x.net for x in lines), sum(x.flagged_count for x in lines),
            sum(x.flagged_amount for x in lines)))
    return result


def check_invariants(total_charged: int, clearings: Sequence[OperatorClearing], *,
                     total_flagged: int | None = None) -> None:
    """Check a period's clearings against what settlement charged: the
    operators' gross adds up to `total_charged` (and their flagged amounts
    to `total_flagged`, when given), each operator id appears once, and
    every line and total obeys the fee rule and adds up (fee + net == gross).

    Raises InvalidArgument naming every violation: these clearings do not
    agree with this total, and must not be paid out or signed."""
    given = _args.items("clearings", clearings)
    if not all(isinstance(c, OperatorClearing) for c in given):
        raise InvalidArgument("clearings are OperatorClearing objects")
    problems: list[str] = []
    seen: set[str] = set()
    for clearing in given:
        if clearing.operator in seen:
            problems.append(f"operator {clearing.operator!r} cleared twice")
        seen.add(clearing.operator)
        problems += _sum_problems(f"operator {clearing.operator!r}", clearing)
    gross = sum(c.gross for c in given if _args.is_int(c.gross))
    if not _args.is_int(total_charged) or gross != total_charged:
        problems.append(f"operators' gross {gross} != total charged {total_charged!r:.40}")
    if total_flagged is not None:
        flagged = sum(c.flagged_amount for c in given if _args.is_int(c.flagged_amount))
        if not _args.is_int(total_flagged) or flagged != total_flagged:
            problems.append(f"operators' flagged {flagged} != total flagged {total_flagged!r:.40}")
    if problems:
        raise InvalidArgument("clearing invariants violated: " + "; ".join(problems))


@dataclass(frozen=True)
class Statement:
    """One operator's statement for one period: the payments scanned at its
    gateways in [from_time, until) (Unix seconds), cleared under fee schedule
    `schedule_version`, issued at `issued_at` (not before `until`). The
    period number, the times and the version are below 2**32. `kid` is the
    settlement key's id once signed and verified, b"" before."""

    period: int
    operator: str
    from_time: int
    until: int
    schedule_version: int
    lines: tuple[ClearingLine, ...]
    gross: int
    fee: int
    net: int
    flagged_count: int
    flagged_amount: int
    issued_at: int
    kid: bytes = b""

    @property
    def count(self) -> int:
        return sum(line.count for line in self.lines)

    @classmethod
    def from_clearing(cls, clearing: OperatorClearing, *, period: int, from_time: int,
                      until: int, schedule: FeeSchedule, issued_at: int) -> Statement:
        """The statement of one operator's clearing, checked: InvalidArgument
        if it does not add up, was cleared under other fees than `schedule`'s
        or the schedule took effect after from_time."""
        if not isinstance(clearing, OperatorClearing) or not isinstance(schedule, FeeSchedule):
            raise InvalidArgument("a statement is made of an OperatorClearing and its FeeSchedule")
        if _args.is_int(from_time) and schedule.effective_from > from_time:
            raise InvalidArgument(f"fee schedule {schedule.version} takes effect after the "
                                  "period starts")
        # The statement names the schedule by version: it must be the one applied.
        if any(isinstance(line, ClearingLine) and line.fee_bps != schedule.bps.get(line.scene)
               for line in clearing.lines):
            raise InvalidArgument(f"the clearing was not made under fee schedule "
                                  f"{schedule.version}")
        statement = cls(period, clearing.operator, from_time, until, schedule.version,
                        clearing.lines, clearing.gross, clearing.fee, clearing.net,
                        clearing.flagged_count, clearing.flagged_amount, issued_at)
        _raise_problems(InvalidArgument, statement)
        return statement


def sign_statement(key: SettlementKey, statement: Statement) -> bytes:
    """The signed msgpack document of a statement, under the key's kid
    (statement.kid is not used). A statement that does not add up is
    never signed: InvalidArgument."""
    if not isinstance(key, SettlementKey):
        raise InvalidKey("a statement is signed with a SettlementKey")
    if not isinstance(statement, Statement):
        raise InvalidArgument("sign_statement takes a Statement")
    _raise_problems(InvalidArgument, statement)
    return sign_document(key, TAG_STATEMENT, {
        "v": FORMAT_VERSION, "kid": key.kid, "period": int(statement.period),
        "operator": statement.operator, "from_time": int(statement.from_time),
        "until": int(statement.until), "schedule_version": int(statement.schedule_version),
        "issued_at": int(statement.issued_at),
        "lines": [[int(x) for x in _line_values(line)] for line in statement.lines],
        "gross": int(statement.gross), "fee": int(statement.fee), "net": int(statement.net),
        "flagged_count": int(statement.flagged_count),
        "flagged_amount": int(statement.flagged_amount),
    })


def verify_statement(data: bytes, public: SettlementPublicKey) -> Statement:
    """A statement from its signed bytes: the signature first (BadSignature),
    then every field's type and range, then the arithmetic (MalformedMessage:
    a validly signed statement that does not add up is not accepted)."""
    if not isinstance(public, SettlementPublicKey):
        raise InvalidKey("a statement is verified with a SettlementPublicKey")
    body, signature = split_document(data)
    verify_document(public, TAG_STATEMENT, body, signature)
    doc = body_map(body, _STATEMENT_FIELDS, max_array=max(SCENE_COUNT, _LINE_LEN),
                   max_map=len(_STATEMENT_FIELDS), max_str=64, max_bin=KID_LEN)
    if doc["v"] != FORMAT_VERSION:
        raise MalformedMessage(f"unsupported statement format {doc['v']}")
    if doc["kid"] != public.kid:
        raise MalformedMessage("the statement names another settlement key than signed it")
    lines = []
    for raw in doc["lines"]:
        if (not isinstance(raw, list) or len(raw) != _LINE_LEN
                or not all(_exact_int(v) for v in raw)):
            raise MalformedMessage(f"a statement line is {_LINE_LEN} integers")
        try:
            scene = as_scene(raw[0])
        except InvalidArgument:
            raise MalformedMessage(f"unknown scene {raw[0]} in a statement line") from None
        lines.append(ClearingLine(scene, *raw[1:]))
    statement = Statement(doc["period"], doc["operator"], doc["from_time"], doc["until"],
                          doc["schedule_version"], tuple(lines), doc["gross"], doc["fee"],
                          doc["net"], doc["flagged_count"], doc["flagged_amount"],
                          doc["issued_at"], doc["kid"])
    _raise_problems(MalformedMessage, statement)
    return statement


def statement_csv(statement: Statement) -> str:
    """The statement as CSV for an accountant (RFC 4180, CRLF): header rows
    (period, operator, the window as ISO 8601 UTC and Unix seconds, schedule
    version, issue time, settlement kid, unit), a blank row, a row per scene
    and a TOTAL row. For reading only: the signed msgpack is what verifies
    (see verify_statement_csv)."""
    if not isinstance(statement, Statement):
        raise InvalidArgument("statement_csv takes a Statement")
    _raise_problems(InvalidArgument, statement)
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(_csv_rows(statement))
    return out.getvalue()


def verify_statement_csv(csv_text: str, signed: bytes, public: SettlementPublicKey
                         ) -> Statement:
    """Verify the signed statement (as verify_statement), then check that the
    CSV says exactly what it says, row by row and cell by cell (line endings
    aside). A CSV that differs is BadSignature: its content is not what the
    settlement key signed."""
    statement = verify_statement(signed, public)
    if not isinstance(csv_text, str):
        raise InvalidArgument("the CSV is text (str)")
    try:
        rows = list(csv.reader(io.StringIO(csv_text, newline="")))
    except csv.Error:
        raise BadSignature("the CSV is not the signed statement (not CSV)") from None
    if rows != _csv_rows(statement):
        raise BadSignature("the CSV does not match the signed statement")
    return statement


def _csv_rows(statement: Statement) -> list[list[str]]:
    s = statement
    rows = [
        ["qrpay statement", f"format {FORMAT_VERSION}"],
        ["period", str(s.period)],
        ["operator", s.operator],
        ["from_time", _iso(s.from_time), str(s.from_time), "inclusive"],
        ["until", _iso(s.until), str(s.until), "exclusive"],
        ["schedule_version", str(s.schedule_version)],
        ["issued_at", _iso(s.issued_at), str(s.issued_at)],
        ["settlement_kid", s.kid.hex()],
        ["amounts", "minor currency units"],
        [],
        list(CSV_COLUMNS),
    ]
    rows += [[line.scene.name, *map(str, _line_values(line)[1:])] for line in s.lines]
    rows.append(["TOTAL", str(s.count), str(s.gross), "", str(s.fee), str(s.net),
                 str(s.flagged_count), str(s.flagged_amount)])
    return rows


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line_values(line: ClearingLine) -> tuple[int, ...]:
    return (int(line.scene), line.count, line.gross, line.fee_bps, line.fee, line.net,
            line.flagged_count, line.flagged_amount)


def _exact_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _operator_ids(operators: Sequence[str]) -> list[str]:
    names = _args.items("operators", operators)
    for name in names:
        if not isinstance(name, str) or not OPERATOR_ID.fullmatch(name):
            raise InvalidArgument(f"operator id {name!r:.80} is not 1-64 of A-Z a-z 0-9 . _ : - "
                                  "starting with a letter or digit")
    if len(set(names)) != len(names):
        raise InvalidArgument("operator ids are unique")
    return names


def _column(name: str, values: object, top: int) -> npt.NDArray[np.int64]:
    """A private int64 copy of a 1-D integer column, each value in [0, top]:
    copied first, then checked, so what is checked is what is summed."""
    try:
        own = np.array(values, copy=True)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{name} must be a 1-D integer array") from None
    if own.ndim != 1 or (own.size and own.dtype.kind not in "iu"):
        raise InvalidArgument(f"{name} must be a 1-D integer array")
    # Checked before the cast: a uint64 2**64 - 1 must not become -1.
    if own.size and (own.min() < 0 or own.max() > top):
        raise InvalidArgument(f"{name} values must be in [0, {top}]")
    return own.astype(np.int64, copy=False)


def _rows(prefix: str, amount: object, scene: object, operator: object, operators: int
          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(amounts, cells) of one set of rows; a row's cell is operator * 7 + scene."""
    amounts = _column(prefix + "amount", amount, U32_MAX)
    scenes = _column(prefix + "scene", scene, SCENE_COUNT - 1)
    indexes = _column(prefix + "operator", operator, MAX_TOTAL)
    if indexes.size and indexes.max() >= operators:
        raise InvalidArgument(f"{prefix}operator values are indexes into the "
                              f"{operators} operator ids")
    if not len(amounts) == len(scenes) == len(indexes):
        raise InvalidArgument(f"{prefix}amount, {prefix}scene and {prefix}operator "
                              "are of one length")
    if len(amounts) >= MAX_ROWS:
        raise InvalidArgument("at most 2**37 rows per call")
    return amounts, indexes * SCENE_COUNT + scenes


def _sums(amounts: npt.NDArray[np.int64], cells: npt.NDArray[np.int64], size: int
          ) -> tuple[list[int], list[int]]:
    """(count, sum of amounts) per cell, exact, in O(rows). bincount sums in
    float64, so each amount goes in as two 16-bit halves: with fewer than
    2**37 rows every partial sum is an integer below 2**53, hence exact."""
    counts = np.bincount(cells, minlength=size)
    low = np.bincount(cells, weights=amounts & 0xFFFF, minlength=size)
    high = np.bincount(cells, weights=amounts >> 16, minlength=size)
    return ([int(c) for c in counts.tolist()],
            [int(h) * 0x10000 + int(lo) for h, lo in zip(high.tolist(), low.tolist())])


def _sum_problems(who: str, total: OperatorClearing | Statement) -> list[str]:
    """Why lines and totals do not add up under the fee rule, in words."""
    lines = total.lines
    if not isinstance(lines, tuple) or not all(isinstance(x, ClearingLine) for x in lines):
        return [f"{who}: lines are a tuple of ClearingLine"]
    problems = []
    for line in lines:
        at = f"{who} line {getattr(line.scene, 'name', line.scene)!r:.20}"
        values = _line_values(line) if isinstance(line.scene, Scene) else ()
        if not values or not all(_args.is_int(v) and 0 <= v < MAX_TOTAL for v in values):
            problems.append(f"{at}: a Scene and integers in [0, 2**62)")
            continue
        if line.fee_bps > BPS_DENOMINATOR:
            problems.append(f"{at}: fee_bps above {BPS_DENOMINATOR}")
        elif line.fee != fee_of(line.gross, line.fee_bps):
            problems.append(f"{at}: fee {line.fee} != gross * fee_bps // 10000")
        if line.fee + line.net != line.gross:
            problems.append(f"{at}: fee + net != gross")
        if not line.count and not line.flagged_count:
            problems.append(f"{at}: no payments, charged or flagged")
        if line.gross > line.count * U32_MAX or line.flagged_amount > line.flagged_count * U32_MAX:
            problems.append(f"{at}: amounts beyond 2**32 - 1 per payment")
    if problems:
        return problems
    scenes = [int(line.scene) for line in lines]
    if scenes != sorted(set(scenes)):
        problems.append(f"{who}: lines are by scene, each scene once")
    for name in ("gross", "fee", "net", "flagged_count", "flagged_amount"):
        value = getattr(total, name)
        if not _args.is_int(value) or value != sum(getattr(x, name) for x in lines):
            problems.append(f"{who}: {name} {value!r:.40} is not the sum of its lines")
    return problems


def _raise_problems(error: type[InvalidArgument] | type[MalformedMessage],
                    statement: Statement) -> None:
    """Fields in range and the arithmetic right, or `error` naming what is not."""
    s = statement
    problems = []
    if not isinstance(s.operator, str) or not OPERATOR_ID.fullmatch(s.operator):
        problems.append(f"operator id {s.operator!r:.80} is not 1-64 of A-Z a-z 0-9 . _ : -")
    times = (s.period, s.from_time, s.until, s.issued_at, s.schedule_version)
    if not all(_args.is_int(t) and 0 <= t <= U32_MAX for t in times) or s.schedule_version < 1:
        problems.append("period, times and schedule version are integers in [0, 2**32)"
                        " (the version from 1)")
    elif not s.from_time < s.until <= s.issued_at:
        problems.append("the window is from_time < until <= issued_at")
    if not isinstance(s.kid, bytes) or len(s.kid) not in (0, KID_LEN):
        problems.append("kid is 4 bytes")
    problems += _sum_problems("statement", s)
    if problems:
        raise error("statement: " + "; ".join(problems))
