"""The command line for periods and clearing: `qrpay settlement operator`,
`settlement fees`, `close`, `statement write|verify`, `archive ls`, and
`qrpay simulate --days N` closing a period per day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrpay import Scene
from test_cli import NOW, credential, gateway_args, keys, make_token, run  # noqa: F401 (fixtures)


def test_a_day_closed_cleared_and_verified_from_the_command_line(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    gw = gateway_args(tmp_path, keys)
    settle = ["--settlement-dir", str(tmp_path / "settle")]
    code, settlement_public, _ = run(capsys, "keys", "new", "settlement", "--out",
                                     str(tmp_path / "settlement.key"))
    assert code == 0 and settlement_public.startswith("qrpay:settlement-public:")
    (tmp_path / "settlement.pub").write_text(settlement_public)
    assert run(capsys, "settlement", "trust", *settle, "--issuer-public",
               str(keys["issuer_public"]))[0] == 0
    code, _, err = run(capsys, "settlement", "operator", *settle, "--gateway-public",
                       str(keys["gateway_public"]), "--operator", "bus-co")
    assert code == 0 and "bus-co" in err
    schedule = tmp_path / "fees.json"
    schedule.write_text(json.dumps({"version": 1, "effective_from": 0,
                                    "bps": {s.name: 100 if s is Scene.BUS else 0
                                            for s in Scene}}))
    code, out, _ = run(capsys, "settlement", "fees", *settle, "--schedule", str(schedule))
    assert code == 0 and json.loads(out)["schedule"]["bps"]["BUS"] == 100
    # (No deny list loaded: the gateway takes amounts up to its stale cap, 300.)
    for amount, at in ((200, NOW + 10), (50, NOW + 20)):
        token = make_token(capsys, keys, credential, tmp_path, at)
        assert run(capsys, "scan", *gw, "--text", token, "--amount", str(amount), "--scene",
                   "bus", "--now", str(at))[0] == 0
    batch = tmp_path / "batch.bin"
    assert run(capsys, "export", *gw, "--out", str(batch), "--now", str(NOW + 60))[0] == 0
    assert run(capsys, "ingest", *settle, str(batch))[0] == 0

    code, out, err = run(capsys, "close", *settle, "--until", str(NOW + 3_600),
                         "--settlement-key", str(tmp_path / "settlement.key"),
                         "--now", str(NOW + 3_700))
    assert code == 0, err
    closed = json.loads(out)
    assert closed["period"] == 1 and closed["charged_total"] == 250
    [bus] = [o for o in closed["operators"] if o["operator"] == "bus-co"]
    assert (bus["gross"], bus["fee"], bus["net"]) == (250, 2, 248)
    code, _, err = run(capsys, "close", *settle, "--until", str(NOW + 3_600),
                       "--settlement-key", str(tmp_path / "settlement.key"),
                       "--now", str(NOW + 3_700))
    assert code == 1 and "PERIOD_CLOSED" in err

    signed, sheet = tmp_path / "bus-co.stmt", tmp_path / "bus-co.csv"
    code, _, err = run(capsys, "statement", "write", "--settlement-dir", str(tmp_path / "settle"),
                       "--period", "1", "--operator", "bus-co", "--out", str(signed),
                       "--csv", str(sheet))
    assert code == 2 and "--settlement-public" in err
    assert run(capsys, "statement", "write", "--settlement-dir", str(tmp_path / "settle"),
               "--period", "1", "--operator", "bus-co", "--out", str(signed), "--csv",
               str(sheet), "--settlement-public", str(tmp_path / "settlement.pub"))[0] == 0
    code, out, _ = run(capsys, "statement", "verify", str(signed), "--settlement-public",
                       str(tmp_path / "settlement.pub"), "--csv", str(sheet))
    verified = json.loads(out)
    assert code == 0 and verified["verified"] and verified["net"] == 248
    assert verified["lines"][0]["scene"] == "BUS"
    # One changed figure in the CSV, or one byte of the statement: refused.
    head, _, tail = sheet.read_text().rpartition(",248")
    sheet.write_text(head + ",249" + tail)
    code, _, err = run(capsys, "statement", "verify", str(signed), "--settlement-public",
                       str(tmp_path / "settlement.pub"), "--csv", str(sheet))
    assert code == 1 and "BAD_SIGNATURE" in err
    data = bytearray(signed.read_bytes())
    data[-1] ^= 1
    signed.write_bytes(bytes(data))
    code, _, err = run(capsys, "statement", "verify", str(signed), "--settlement-public",
                       str(tmp_path / "settlement.pub"))
    assert code == 1 and "BAD_SIGNATURE" in err

    code, out, _ = run(capsys, "archive", "ls", *settle)
    [listed] = json.loads(out)["periods"]
    assert code == 0 and listed["period"] == 1 and listed["archived"]
    assert listed["charged_total"] == 250 and Path(listed["path"]).is_dir()
    code, out, _ = run(capsys, "report", *settle)
    assert code == 0 and json.loads(out)["charged_total"] == 0   # the open period is empty


def test_simulate_closes_a_period_each_day(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code, printed, err = run(capsys, "simulate", "--citizens", "400", "--trips", "2",
                             "--days", "3", "--seed", "5", "--json", str(out),
                             "--workdir", str(tmp_path / "w"))
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["periods"]) == 3
    for period in report["periods"]:
        assert period["charged"] == period["owed_before_fees"] == (
            period["fees"] + period["net_payable"])
        assert period["charged"] + period["flagged_not_charged"] == period[
            "accepted_at_gateways"]
        assert period["records"] > 0
    assert report["periods"][0]["flagged_not_charged"] > 0     # day 1's planted fraud
    assert report["settlement"]["day_1_statements_verified"] >= 5
    code, listed, _ = run(capsys, "archive", "ls", "--settlement-dir",
                          str(tmp_path / "w" / "settlement"))
    assert code == 0 and [p["period"] for p in json.loads(listed)["periods"]] == [1, 2, 3]
    with pytest.raises(SystemExit) as exited:
        run(capsys, "simulate", "--days", "0")
    assert exited.value.code == 2 and "--days" in capsys.readouterr().err
