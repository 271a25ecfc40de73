"""What every `qrpay` command shares: --version, --json (one document on
stdout, checked against the schemas docs/CLI.md lists), --quiet, `-` for
stdin and stdout, times as ISO 8601 or Unix seconds, help with an example
for every command and text for every option, the config file and
environment (flag over environment over file), bulk scan and repay, and
progress bars drawn on a terminal only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qrpay import __version__, cli
from qrpay.cli_output import iso, parse_time
from terminal import run_in_terminal
from test_cli import NOW, a_day, credential, gateway_args, keys, make_token, run  # noqa: F401
from test_cli import settle_args

QRPAY = [sys.executable, "-m", "qrpay"]


def qrpay(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*QRPAY, *args], input=stdin, capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


# -- JSON schemas of the documents the commands print with --json (docs/CLI.md) ------

INT, STR, BOOL = {"type": "integer"}, {"type": "string"}, {"type": "boolean"}


def obj(required: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": required, "required": list(required),
            **extra}


RECEIPT = obj({"gateway": STR, "record": INT, "account": INT, "serial": INT, "counter": INT,
               "amount": INT, "scene": STR, "time": INT, "duplicate": BOOL})
SCHEMAS: dict[str, dict[str, Any]] = {
    "keys new": obj({"role": STR, "public": STR, "secret_file": STR}),
    "keys public": obj({"role": STR, "public": STR}),
    "issue": obj({"issued": BOOL, "credential": STR, "account": INT, "limit": INT,
                  "scenes": {"type": "array", "items": STR}, "not_before": INT,
                  "not_after": INT, "serial": INT}),
    "token": obj({"token": STR, "counter": INT}),
    "scan": RECEIPT,
    "scan --file": obj({"tokens": INT, "accepted": INT, "refused": {"type": "object"},
                        "reasons": {"type": "array", "items": STR},
                        "receipts": {"type": "array", "items": RECEIPT}}),
    "export": obj({"written": BOOL, "out": STR, "bytes": INT}),
    "ack": obj({"acknowledged": INT}),
    "deny-list publish": obj({"version": INT, "added": INT, "out": STR}),
    "deny-list apply": obj({"version": INT, "credentials": INT, "already_in_force": BOOL}),
    "ingest": obj({"batches": {"type": "array", "items": obj(
        {"file": STR, "status": STR, "gateway": STR, "seq": INT, "records": INT,
         "invalid": INT})}}),
    "report": obj({"records": INT, "charged_total": INT, "findings": {"type": "array"}}),
    "settlement keys": obj({"keys": {"type": "array", "items": obj(
        {"key": STR, "kid": STR, "roles": {"type": "array"}, "not_before": INT,
         "not_after": INT})}}),
    "repay": obj({"account": INT, "amount": INT, "reference": STR, "paid_at": INT,
                  "stored": BOOL}),
    "repay --file": obj({"file": STR, "rows": INT, "stored": INT, "stored_before": INT,
                         "total": INT}),
    "history": obj({"out": STR, "accounts": INT, "at": INT, "in_credit": INT}),
}


def json_of(capsys: pytest.CaptureFixture[str], schema: str, *args: str,
            code: int = 0) -> dict[str, Any]:
    """Run a command with --json: its exit code, and stdout one JSON document
    valid against its schema."""
    got, out, err = run(capsys, *args, "--json")
    assert got == code, (args, err)
    document = json.loads(out)   # one document: json.loads takes nothing after it
    jsonschema.validate(document, SCHEMAS[schema])
    return document


def test_version() -> None:
    done = qrpay("--version")
    assert done.returncode == 0 and done.stdout.decode().strip() == f"qrpay {__version__}"


def test_every_command_has_an_example_and_every_option_help_text() -> None:
    leaves = cli._leaves(cli.build_parser())
    assert len(leaves) >= 30
    for name, leaf in leaves:
        text = leaf.format_help()
        assert re.search(r"(?i)examples?:\s*\n\s+qrpay ", text), name
        assert "--json" in text and "--quiet" in text and "--config" in text, name
        for action in leaf._actions:
            assert action.help, (name, action.option_strings or action.dest)
            if action.type is parse_time:
                assert "ISO 8601" in action.help, (name, action.option_strings)
            if action.type in (cli._scene, cli._scenes):
                assert "bus" in action.help and "canteen" in action.help, name
    # A required option is shown as required, also where a config may give it.
    close = dict(leaves)["close"].format_help()
    assert re.search(r"--settlement-key.*\[required:\s+here,\s+or\s+env\s+"
                     r"QRPAY_SETTLEMENT_KEY", close, re.S)


def test_times_are_iso_8601_or_unix_seconds() -> None:
    assert parse_time("1800000000") == 1_800_000_000
    assert parse_time("2027-01-15T08:30:00Z") == 1_800_001_800
    assert parse_time("2027-01-15T16:30:00+08:00") == 1_800_001_800
    assert parse_time("2027-01-15T08:30:00") == 1_800_001_800   # no zone: UTC
    assert iso(1_800_001_800) == "2027-01-15T08:30:00Z"
    for bad in ("yesterday", "2027-13-01", "-5", "4294967296", "2200-01-01"):
        with pytest.raises(Exception) as info:
            parse_time(bad)
        assert "ISO 8601" in str(info.value) or "at most" in str(info.value), bad


def test_the_day_in_json_with_iso_times_and_stdin_stdout(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gw, settle = gateway_args(tmp_path, keys), settle_args(tmp_path, keys)
    at = iso(NOW)
    published = json_of(capsys, "deny-list publish", "deny-list", "publish", *settle,
                        "--issuer-key", str(keys["issuer"]), "--gateway-public",
                        str(keys["gateway_public"]), "--out", str(tmp_path / "deny1"),
                        "--now", at)
    applied = json_of(capsys, "deny-list apply", "deny-list", "apply", *gw, "--file",
                      str(tmp_path / "deny1"), "--now", at)
    assert applied["version"] == published["version"] and not applied["already_in_force"]
    token = make_token(capsys, keys, credential, tmp_path)
    receipt = json_of(capsys, "scan", "scan", *gw, "--text", token, "--amount", "200",
                      "--scene", "bus", "--now", at)
    assert (receipt["account"], receipt["amount"], receipt["time"]) == (42, 200, NOW)
    # The batch to stdout, and from there into ingest on stdin.
    batch = qrpay("export", *gw, "--out", "-", "--now", str(NOW + 60))
    assert batch.returncode == 0 and len(batch.stdout) > 100
    ingested = qrpay("ingest", *settle, "--gateway-public", str(keys["gateway_public"]), "-",
                     "--json", stdin=batch.stdout)
    assert ingested.returncode == 0, ingested.stderr
    document = json.loads(ingested.stdout)
    jsonschema.validate(document, SCHEMAS["ingest"])
    assert [(b["file"], b["status"], b["records"]) for b in document["batches"]] == [
        ("-", "applied", 1)]
    report = json_of(capsys, "report", "report", *settle)
    assert report["charged_total"] == 200
    acked = json_of(capsys, "ack", "ack", *gw, "--seq", "1", "--now", str(NOW + 120))
    assert acked["acknowledged"] == 1
    assert json_of(capsys, "settlement keys", "settlement", "keys", *settle[:2]) == {
        "keys": []}   # --issuer-public trusts a key for one command only
    code, _, err = run(capsys, "settlement", "trust", *settle, "--not-before", at)
    assert code == 0 and f"from {at}" in err
    listed = json_of(capsys, "settlement keys", "settlement", "keys", *settle[:2])
    assert listed["keys"][0]["key"] == keys["issuer_public"]
    assert listed["keys"][0]["not_before"] == NOW
    paid = json_of(capsys, "repay", "repay", *settle, "--account", "42", "--amount", "50",
                   "--reference", "TX-1", "--now", iso(NOW + 3_600))
    assert paid["stored"] and paid["paid_at"] == NOW + 3_600
    history = json_of(capsys, "history", "history", *settle, "--out",
                      str(tmp_path / "h.csv"), "--now", str(NOW + 7_200))
    assert history["accounts"] == 1
    # keys: the public key from a secret key read on stdin; a secret never to stdout.
    shown = qrpay("keys", "public", "-", "--json", stdin=Path(keys["issuer"]).read_bytes())
    assert json.loads(shown.stdout) == {"role": "issuer", "public": keys["issuer_public"]}
    code, out, err = run(capsys, "keys", "new", "device", "--out", "-")
    assert code == 2 and "never to stdout" in err and "secret" not in out
    made = json_of(capsys, "keys new", "keys", "new", "device", "--out",
                   str(tmp_path / "d2.key"))
    assert made["public"].startswith("qrpay:device-public:")
    issued = json_of(capsys, "issue", "issue", "--issuer-key", str(keys["issuer"]),
                     "--device-public", made["public"], "--account", "7", "--limit", "900",
                     "--scenes", "bus,ferry", "--not-before", "2027-01-15", "--days", "2")
    assert issued["not_before"] == parse_time("2027-01-15") and issued["scenes"] == [
        "bus", "ferry"]
    token_doc = json_of(capsys, "token", "token", "--credential", str(credential),
                        "--device-key", str(keys["device"]), "--scene", "metro", "--now", at)
    assert token_doc["token"].startswith("QP:")
    # --json and an --out of - would both write stdout.
    with pytest.raises(SystemExit) as info:
        cli.main(["export", *gw, "--out", "-", "--json"])
    assert info.value.code == 2 and "--json prints its document" in capsys.readouterr().err


def test_quiet_keeps_stderr_for_errors_only(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    batch = a_day(tmp_path, keys, credential, capsys)
    settle = settle_args(tmp_path, keys)
    code, out, err = run(capsys, "history", *settle, "--out", str(tmp_path / "h.csv"), "-q")
    assert code == 0 and out == "" and err == ""
    code, out, err = run(capsys, "history", *settle, "--out", str(tmp_path / "h.csv"))
    assert code == 0 and "wrote" in err
    code, _, err = run(capsys, "ingest", *settle, str(batch), str(tmp_path / "none"), "-q")
    assert code == 2 and "batch file not found" in err   # the error still shows


def test_config_file_and_environment_with_flag_over_env_over_file(
        tmp_path: Path, keys: dict[str, Path | str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Three stores, each trusting a different issuer key: `settlement keys`
    # tells which one a command opened.
    publics = {}
    for name in ("flag", "env", "file"):
        code, out, _ = run(capsys, "keys", "new", "issuer", "--out", str(tmp_path / name))
        publics[name] = out.strip()
        code, _, err = run(capsys, "settlement", "trust", "--settlement-dir",
                           str(tmp_path / f"store-{name}"), "--issuer-public", out.strip())
        assert code == 0, err
    config = tmp_path / "qrpay.toml"
    config.write_text(f'settlement-dir = "{tmp_path / "store-file"}"\n')

    def opened(*args: str) -> str:
        code, out, err = run(capsys, "settlement", "keys", *args)
        assert code == 0, err
        [key] = json.loads(out)["keys"]
        return next(name for name, public in publics.items() if public == key["key"])

    monkeypatch.delenv("QRPAY_SETTLEMENT_DIR", raising=False)
    monkeypatch.delenv("QRPAY_CONFIG", raising=False)
    assert opened("--config", str(config)) == "file"
    monkeypatch.setenv("QRPAY_CONFIG", str(config))
    assert opened() == "file"
    monkeypatch.setenv("QRPAY_SETTLEMENT_DIR", str(tmp_path / "store-env"))
    assert opened() == "env"
    assert opened("--settlement-dir", str(tmp_path / "store-flag")) == "flag"
    # A command table beats the top level for that command only.
    config.write_text(f'settlement-dir = "{tmp_path / "store-file"}"\n'
                      f'["settlement keys"]\nsettlement-dir = "{tmp_path / "store-flag"}"\n')
    monkeypatch.delenv("QRPAY_SETTLEMENT_DIR")
    assert opened() == "flag"
    # Required and given nowhere: the message names all three places.
    monkeypatch.delenv("QRPAY_CONFIG")
    with pytest.raises(SystemExit) as info:
        cli.main(["settlement", "keys"])
    assert info.value.code == 2
    assert "QRPAY_SETTLEMENT_DIR" in capsys.readouterr().err
    # A typo in the file is an error, not an option silently left out.
    config.write_text('setlement-dir = "x"\n')
    code, _, err = run(capsys, "settlement", "keys", "--config", str(config))
    assert code == 2 and "unknown key 'setlement-dir'" in err
    config.write_text("settlement-dir = [\n")
    code, _, err = run(capsys, "settlement", "keys", "--config", str(config))
    assert code == 2 and "is not TOML" in err
    # A repeatable option from the environment: comma-separated.
    monkeypatch.setenv("QRPAY_ISSUER_PUBLIC", f"{publics['flag']},{publics['env']}")
    args = cli.build_parser().parse_args(["scan", "--gateway-dir", "g", "--gateway-key", "k",
                                          "--text", "t", "--amount", "1", "--scene", "bus"])
    cli.cli_config.fill(args._leaf, args, {})
    assert args.issuer_public == [publics["flag"], publics["env"]]
    monkeypatch.setenv("QRPAY_WORKERS", "many")
    args = cli.build_parser().parse_args(["scale", "settle", "--archive", "a", "--now", "1"])
    with pytest.raises(SystemExit):
        cli.cli_config.fill(args._leaf, args, {})
    assert "$QRPAY_WORKERS: 'many' is not a whole number" in capsys.readouterr().err


def test_bulk_scan_and_repay_from_files(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gw, settle = gateway_args(tmp_path, keys), settle_args(tmp_path, keys)
    tokens = [make_token(capsys, keys, credential, tmp_path, NOW + i) for i in range(5)]
    listing = tmp_path / "tokens.txt"
    listing.write_text("\n".join([*tokens, tokens[0]]) + "\n\n")   # the first one twice
    done = json_of(capsys, "scan --file", "scan", *gw, "--file", str(listing), "--amount",
                   "100", "--scene", "bus", "--now", str(NOW + 10))
    assert done["tokens"] == 6 and done["accepted"] == 6   # a repeat is a duplicate receipt
    assert [r["duplicate"] for r in done["receipts"]] == [False] * 5 + [True]
    refused = json_of(capsys, "scan --file", "scan", *gw, "--file", str(listing), "--amount",
                      "100", "--scene", "ferry", "--now", str(NOW + 20), code=1)
    assert refused["accepted"] == 0 and set(refused["refused"]) == {"SCENE_MISMATCH"}
    bad = tmp_path / "bad.txt"
    bad.write_text(tokens[0] + "\nQP:nonsense\n")
    code, _, err = run(capsys, "scan", *gw, "--file", str(bad), "--amount", "1", "--scene",
                       "bus")
    assert code == 2 and "token 2" in err
    # A bank file: header, ISO and Unix times, a default time; stored in one go.
    code, _, err = run(capsys, "settlement", "trust", *settle[:2], "--issuer-public",
                       str(keys["issuer_public"]))
    bank = tmp_path / "bank.csv"
    bank.write_text("account,amount,reference,paid_at\n42,100,B-1,2027-01-15T09:00:00Z\n"
                    f"42,150,B-2,{NOW + 7_200}\n43,10,B-3,\n")
    paid = json_of(capsys, "repay --file", "repay", *settle[:2], "--file", str(bank),
                   "--now", str(NOW))
    assert (paid["rows"], paid["stored"], paid["total"]) == (3, 3, 260)
    again = json_of(capsys, "repay --file", "repay", *settle[:2], "--file", str(bank),
                    "--now", str(NOW))
    assert (again["stored"], again["stored_before"]) == (0, 3)
    bank.write_text("account,amount\n42,5\n")
    code, _, err = run(capsys, "repay", *settle[:2], "--file", str(bank))
    assert code == 2 and "no reference column" in err
    bank.write_text("account,amount,reference\n42,lots,B-9\n")
    code, _, err = run(capsys, "repay", *settle[:2], "--file", str(bank))
    assert code == 2 and "line 2" in err
    piped = qrpay("repay", *settle[:2], "--file", "-", "--now", str(NOW), "--json",
                  stdin=b"account,amount,reference\n44,70,B-10\n")
    assert piped.returncode == 0 and json.loads(piped.stdout)["stored"] == 1


def test_ingest_draws_a_progress_bar_on_a_terminal_only(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gw, settle = gateway_args(tmp_path, keys), settle_args(tmp_path, keys)
    batches = []
    for i in range(3):
        token = make_token(capsys, keys, credential, tmp_path, NOW + i)
        for args in (["scan", *gw, "--text", token, "--amount", "100", "--scene", "bus",
                      "--now", str(NOW + i)],
                     ["export", *gw, "--out", str(tmp_path / f"b{i}"), "--now", str(NOW + i)],
                     ["ack", *gw, "--seq", str(i + 1), "--now", str(NOW + i)]):
            code, _, err = run(capsys, *args)
            assert code == 0, err
        batches.append(str(tmp_path / f"b{i}"))
    ingest = [*QRPAY, "ingest", *settle, "--gateway-public", str(keys["gateway_public"])]
    screen = run_in_terminal([*ingest, *batches], cwd=str(tmp_path))
    assert screen.exit_code == 0, screen.text
    assert re.search(r"ingesting: 100%\|.+\| 3/3 \[", screen.text), screen.text
    piped = qrpay(*ingest[len(QRPAY):], *batches)
    assert piped.returncode == 0 and b"%|" not in piped.stderr and b"ingesting" not in piped.stderr
    for quiet in ("--json", "-q"):
        screen = run_in_terminal([*ingest, *batches, quiet], cwd=str(tmp_path))
        assert screen.exit_code == 0 and "%|" not in screen.text, screen.text


def test_close_and_simulate_draw_their_bars_on_a_terminal(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    settle = _ready_to_close(tmp_path, keys, credential, capsys)
    assert run(capsys, "keys", "new", "settlement", "--out",
               str(tmp_path / "settlement.key"))[0] == 0
    screen = run_in_terminal([*QRPAY, "close", *settle, "--until", iso(NOW + 3_600),
                              "--settlement-key", str(tmp_path / "settlement.key"),
                              "--now", iso(NOW + 7_200)])
    assert screen.exit_code == 0, screen.text
    assert re.search(r"closed: 100%\|.+\| 3/3 \[", screen.text), screen.text
    assert '"charged_total": 200' in screen.text
    # simulate: a bar over its stages in place of the stage lines, then the report.
    screen = run_in_terminal([*QRPAY, "simulate", "--citizens", "300", "--days", "2"],
                             timeout=300)
    assert screen.exit_code == 0, screen.text
    assert re.search(r"100%\|.+\| 12/12 \[", screen.text), screen.text
    assert "result: OK" in screen.text and "... " not in screen.text
    piped = qrpay("simulate", "--citizens", "300", "-q")
    assert piped.returncode == 0 and piped.stderr == b"" and b"result: OK" in piped.stdout


def test_close_reports_its_steps_to_a_callback(
        tmp_path: Path, keys: dict[str, Path | str], credential: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from qrpay.settlement import Settlement
    from qrpay.keys import SettlementKey
    _ready_to_close(tmp_path, keys, credential, capsys)
    heard: list[tuple[int, int, str]] = []
    with Settlement(str(tmp_path / "settle")) as settlement:
        settlement.close_period(NOW + 3_600, SettlementKey.generate(), now=NOW + 7_200,
                                progress=lambda *step: heard.append(step))
    assert [(done, total) for done, total, _ in heard] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert heard[-1][2] == "closed"


def _ready_to_close(tmp_path: Path, keys: dict[str, Path | str], credential: Path,
                    capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A store holding a_day's batch, its gateway's operator and a fee
    schedule: what a close needs. Returns the store's options."""
    from qrpay import Scene
    batch = a_day(tmp_path, keys, credential, capsys)
    settle = settle_args(tmp_path, keys)
    schedule = tmp_path / "fees.json"
    schedule.write_text(json.dumps({"version": 1, "effective_from": 0,
                                    "bps": {s.name: 100 for s in Scene}}))
    for args in (["ingest", *settle, str(batch)],
                 ["settlement", "operator", *settle[:2], "--gateway-public",
                  str(keys["gateway_public"]), "--operator", "bus-co"],
                 ["settlement", "fees", *settle[:2], "--schedule", str(schedule)]):
        code, _, err = run(capsys, *args)
        assert code == 0, (args, err)
    return settle


def test_outputs_get_the_umask_mode_and_secret_keys_0600(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(0o022)
    try:
        code, public, _ = run(capsys, "keys", "new", "issuer", "--out", str(tmp_path / "k"))
        (tmp_path / "k.pub").write_text(public)
        code, _, _ = run(capsys, "score", "sample", "--accounts", "50", "--out",
                         str(tmp_path / "s.csv"))
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o644


def test_score_apply_draws_reading_and_scoring_bars_on_a_terminal(tmp_path: Path) -> None:
    for args in (["score", "sample", "--accounts", "150000", "--seed", "3", "--out", "a.csv"],
                 ["score", "fit", "--data", "a.csv", "--label", "defaulted", "--id-column",
                  "account", "--out", "card.json"]):
        done = qrpay(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    apply = [*QRPAY, "score", "apply", "--card", "card.json", "--data", "a.csv",
             "--id-column", "account", "--out", "scores.csv"]
    fitted = qrpay(*apply[len(QRPAY):], cwd=tmp_path)   # the label column is no feature
    assert fitted.returncode == 2 and b"defaulted" in fitted.stderr
    done = qrpay("score", "sample", "--accounts", "150000", "--seed", "4", "--no-label",
                 "--out", "a.csv", cwd=tmp_path)
    assert done.returncode == 0
    screen = run_in_terminal(apply, cwd=str(tmp_path))
    assert screen.exit_code == 0, screen.text
    assert re.search(r"reading: 100%\|.+\| 150000/150000 \[", screen.text), screen.text
    assert re.search(r"scoring: 100%\|.+\| 150000/150000 \[", screen.text), screen.text
    piped = qrpay(*apply[len(QRPAY):], cwd=tmp_path)
    assert piped.returncode == 0 and b"%|" not in piped.stderr
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 150_001
