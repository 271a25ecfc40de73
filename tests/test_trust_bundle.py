"""Trust bundles: issuer keys rotated in and out at gateways by a bundle the
root key signs (qrpay.trustbundle), as the settlement service serves them."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrpay import (
    DeviceKey, GatewayKey, IssuerKey, Reason, Role, Scene, TokenGenerator, TrustStore, errors,
)
from qrpay.denylist import sign_deny_list
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.keys import RootKey
from qrpay.trust import TrustedKey
from qrpay.trustbundle import TrustBundle, sign_trust_bundle

NOW = 1_800_000_000
ROOT = RootKey(b"\x21" * 32)
OLD, NEW = IssuerKey(b"\x22" * 32), IssuerKey(b"\x23" * 32)
BOTH = Role.CREDENTIALS | Role.DENY_LIST
POLICY = GatewayPolicy(deny_list_max_age=None)


def _token(issuer: IssuerKey, at: int) -> bytes:
    device = DeviceKey(b"\x24" * 32)
    credential = issuer.issue(account=9, device_public=device.public, limit=10_000,
                              scenes=[Scene.BUS], not_before=NOW - 3600,
                              not_after=NOW + 86_400)
    return TokenGenerator(credential, device).make(Scene.BUS, at)


def _provisioned() -> TrustStore:
    trust = TrustStore()
    trust.add(OLD, roles=BOTH)
    return trust


def test_a_bundle_verifies_against_its_root_only() -> None:
    signed = sign_trust_bundle(ROOT, 1, [TrustedKey(NEW.public, 0, NOW + 86_400, BOTH)], NOW)
    bundle = TrustBundle.load(signed, ROOT.public)
    assert bundle.version == 1 and [k.kid for k in bundle.keys] == [NEW.kid]
    with pytest.raises(errors.MalformedMessage, match="another root"):
        TrustBundle.load(signed, RootKey(b"\x25" * 32).public)
    forged = bytearray(signed)
    forged[-2] ^= 1
    with pytest.raises(errors.BadSignature):
        TrustBundle.load(bytes(forged), ROOT.public)
    with pytest.raises(errors.InvalidKey):
        sign_trust_bundle(OLD, 1, [], NOW)   # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        sign_trust_bundle(ROOT, 1, [TrustedKey(NEW.public, 0, 1, BOTH)] * 2, NOW)


def test_a_gateway_rotates_an_issuer_key_in_and_out(tmp_path: Path) -> None:
    with Gateway(tmp_path / "gw", GatewayKey(b"\x26" * 32), _provisioned(), POLICY,
                 root=ROOT.public) as gateway:
        new_token = _token(NEW, NOW)
        assert gateway.scan_batch([new_token], [10], Scene.BUS, now=NOW).reasons.tolist() == [
            Reason.UNKNOWN_KID]
        first = sign_trust_bundle(ROOT, 1, [TrustedKey(NEW.public, 0, NOW + 86_400, BOTH)],
                                  NOW)
        gateway.update_trust(first, now=NOW)
        assert gateway.update_trust(first, now=NOW).version == 1   # the same again: nothing
        assert gateway.scan(_token(NEW, NOW + 1), 10, Scene.BUS, now=NOW + 1).amount == 10
        # A deny list signed by the new key is accepted too.
        gateway.update_deny_list(sign_deny_list(NEW, 1, [5], NOW + 2), now=NOW + 2)
        # The next bundle ends the old key's window: its tokens are refused.
        second = sign_trust_bundle(ROOT, 2, [TrustedKey(NEW.public, 0, NOW + 86_400, BOTH),
                                             TrustedKey(OLD.public, 0, NOW + 5, BOTH)], NOW + 10)
        gateway.update_trust(second, now=NOW + 10)
        refused = gateway.scan_batch([_token(OLD, NOW + 20)], [10], Scene.BUS, now=NOW + 20)
        assert refused.reasons.tolist() == [Reason.ISSUER_KEY_NOT_VALID]
        with pytest.raises(errors.StaleUpdate):
            gateway.update_trust(first, now=NOW + 20)         # older
        future = sign_trust_bundle(ROOT, 3, [], NOW + 10_000)
        with pytest.raises(errors.StaleUpdate):
            gateway.update_trust(future, now=NOW + 20)        # from the future
    # Reopened with only the provisioned key, it trusts what the bundle said.
    with Gateway(tmp_path / "gw", GatewayKey(b"\x26" * 32), _provisioned(), POLICY,
                 root=ROOT.public) as gateway:
        assert gateway.trust_bundle is not None and gateway.trust_bundle.version == 2
        assert gateway.deny_list.version == 1 and 5 in gateway.deny_list
        assert gateway.scan(_token(NEW, NOW + 30), 10, Scene.BUS, now=NOW + 30).amount == 10
    with pytest.raises(errors.InvalidArgument, match="root"):
        Gateway(tmp_path / "gw", GatewayKey(b"\x26" * 32), _provisioned(), POLICY)


def test_the_command_line_signs_and_shows_a_bundle(tmp_path: Path) -> None:
    import json

    from qrpay.cli import main
    (tmp_path / "root.key").write_text(ROOT.secret_text())
    (tmp_path / "keys.json").write_text(json.dumps([
        {"key": NEW.public.to_text(), "roles": "credentials,deny-list", "not_after": NOW + 99},
        {"key": OLD.public.to_text(), "roles": "credentials", "not_before": 5}]))
    assert main(["trust-bundle", "sign", "--root-key", str(tmp_path / "root.key"), "--keys",
                 str(tmp_path / "keys.json"), "--version", "4", "--now", str(NOW),
                 "--out", str(tmp_path / "bundle")]) == 0
    bundle = TrustBundle.load((tmp_path / "bundle").read_bytes(), ROOT.public)
    assert bundle.version == 4 and bundle.issued_at == NOW
    assert {(k.kid, k.roles, k.not_before, k.not_after) for k in bundle.keys} == {
        (NEW.kid, BOTH, 0, NOW + 99), (OLD.kid, Role.CREDENTIALS, 5, 2**32 - 1)}
    assert main(["trust-bundle", "show", "--root-public", ROOT.public.to_text(),
                 "--file", str(tmp_path / "bundle")]) == 0
    other = RootKey(b"\x27" * 32).public.to_text()
    assert main(["trust-bundle", "show", "--root-public", other,
                 "--file", str(tmp_path / "bundle")]) == 2      # another root's: refused
    (tmp_path / "keys.json").write_text('{"not": "a list"}')
    assert main(["trust-bundle", "sign", "--root-key", str(tmp_path / "root.key"), "--keys",
                 str(tmp_path / "keys.json"), "--version", "5",
                 "--out", str(tmp_path / "b2")]) == 2
