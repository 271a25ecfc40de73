"""qrpay's logs (qrpay.logs.configure): one JSON object per line on
stderr, the level honoured, and no token (text or bytes) nor secret key in
any line, whatever a caller puts in a message, its arguments or its extra
fields."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrpay import DeviceKey, GatewayKey, IssuerKey, Role, Scene, TokenGenerator, TrustStore, cli
from qrpay import encode_text, logs
from qrpay.gateway import Gateway

NOW = 1_800_000_000
ISSUER = IssuerKey(bytes(range(32)))
GATEWAY_KEY = GatewayKey(b"\x46" * 32)


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    logger = logging.getLogger("qrpay")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _token() -> bytes:
    device = DeviceKey(b"\x05" * 32)
    credential = ISSUER.issue(account=5005, device_public=device.public, limit=10**6,
                              scenes=[Scene.BUS], not_before=NOW - 3600,
                              not_after=NOW + 86_400, serial=555)
    return TokenGenerator(credential, device).make(Scene.BUS, NOW)


def _lines(err: str) -> list[dict[str, object]]:
    lines = err.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]   # each line one JSON object


def test_a_line_is_one_json_object_with_time_level_logger_message_and_extras(
        capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", json_format=True)
    log = logging.getLogger("qrpay.gateway")
    log.info("opened %s with %d records", "gw", 12, extra={"gateway": "c9c63c2a", "n": 3})
    log.debug("not shown at info")
    try:
        raise OSError("disk full")
    except OSError:
        log.exception("journal write failed")
    first, second = _lines(capsys.readouterr().err)
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert first["level"] == "info" and first["logger"] == "qrpay.gateway"
    assert first["message"] == "opened gw with 12 records"
    assert first["gateway"] == "c9c63c2a" and first["n"] == 3
    when = dt.datetime.fromisoformat(str(first["time"]).replace("Z", "+00:00"))
    assert when.tzinfo is not None and abs(
        (dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 60
    assert second["level"] == "error" and "OSError: disk full" in str(second["exception"])


def test_levels_and_a_second_configure(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("warning", json_format=True)
    logs.configure("DEBUG", json_format=True)   # replaces the first: one line per record
    logging.getLogger("qrpay").debug("once")
    assert [line["message"] for line in _lines(capsys.readouterr().err)] == ["once"]
    logs.configure("error", json_format=False)
    logging.getLogger("qrpay.x").warning("hidden")
    logging.getLogger("qrpay.x").error("shown %s", "plainly")
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(" error qrpay.x: shown plainly")
    with pytest.raises(ValueError, match="not one of debug, info"):
        logs.configure("verbose", json_format=True)


def test_the_access_log_becomes_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", json_format=True)
    logging.getLogger("qrpay.access").info(json.dumps({"method": "POST", "status": 201}))
    [line] = _lines(capsys.readouterr().err)
    assert line["method"] == "POST" and line["status"] == 201 and line["message"] == ""


@pytest.mark.parametrize("json_format", [True, False])
def test_no_token_or_secret_key_reaches_a_log(tmp_path: Path, json_format: bool,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    token = _token()
    text = encode_text(token)
    secret = GATEWAY_KEY.secret_text()
    forms = [text, text[3:40], secret, secret.rsplit(":", 1)[1], token.hex()[:32],
             repr(token)[2:40], base64.b64encode(token).decode()[:32],
             base64.urlsafe_b64encode(GATEWAY_KEY.secret_bytes()).decode()[:20]]
    logs.configure("debug", json_format=json_format)
    log = logging.getLogger("qrpay.test")
    # Everything a careless caller could hand the logger.
    log.info("scanned %s", text)
    log.info("scanned %r", token)
    log.info("raw %s", token)
    log.info("key %s in %s", secret, "gw.key")
    log.info("message with the token inline: " + text)
    log.info("scan", extra={"token": text, "raw": token, "key": secret, "tokens": [token, text],
                            "detail": {"secret": secret, "seen": text}})
    try:
        raise ValueError(f"bad token {text} for key {secret}")
    except ValueError:
        log.exception("refused")
    logged = capsys.readouterr().err
    # And a real scan through the command line, logged at debug.
    trust = TrustStore()
    trust.add(ISSUER, roles=Role.CREDENTIALS | Role.DENY_LIST)
    Gateway(tmp_path / "gw", GATEWAY_KEY, trust).close()
    (tmp_path / "gw.key").write_text(secret)
    (tmp_path / "issuer.pub").write_text(ISSUER.public.to_text())
    code = cli.main(["scan", "--gateway-dir", str(tmp_path / "gw"), "--gateway-key",
                     str(tmp_path / "gw.key"), "--issuer-public", str(tmp_path / "issuer.pub"),
                     "--text", text, "--amount", "200", "--scene", "bus", "--now", str(NOW)])
    out, err = capsys.readouterr()
    assert code == 0 and '"amount": 200' in out
    for form in forms:
        assert form not in logged + err, form
    assert "QP:<redacted>" in logged and "qrpay:gateway-secret:<redacted>" in logged
    assert f"<{len(token)} bytes>" in logged
    if json_format:
        lines = _lines(logged)
        assert len(lines) == 7
        extra = next(line for line in lines if line["message"] == "scan")
        assert extra["token"] == "<redacted>" and extra["raw"] == f"<{len(token)} bytes>"
        assert extra["key"] == "qrpay:gateway-secret:<redacted>"
        assert extra["tokens"] == [f"<{len(token)} bytes>", "QP:<redacted>"]
        assert extra["detail"] == {"secret": "<redacted>", "seen": "QP:<redacted>"}
