"""Deny-list deltas: what settlement signs when it publishes, and what a
gateway accepts on top of the list it holds (docs/SERVICE.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qrpay import GatewayKey, IssuerKey, Role, TrustStore, errors
from qrpay.denylist import (
    DenyDelta, DenyList, deny_list_etag, serials_digest, sign_deny_delta, sign_deny_list,
)
from qrpay.gateway import Gateway, GatewayPolicy
from qrpay.settlement import DENY_DELTAS
from stores import open_settlement

NOW = 1_800_000_000
serial_sets = st.sets(st.integers(0, 2**64 - 1), max_size=40)


def _list(key: IssuerKey, trust: TrustStore, version: int, serials: set[int]) -> DenyList:
    return DenyList.load(sign_deny_list(key, version, serials, NOW + version), trust)


ISSUER = IssuerKey(bytes(range(32)))
TRUST = TrustStore()
TRUST.add(ISSUER, roles=Role.CREDENTIALS | Role.DENY_LIST)


@settings(max_examples=200)
@given(old=serial_sets, new=serial_sets)
def test_a_delta_makes_exactly_the_newer_list(old: set[int], new: set[int]) -> None:
    issuer, deny_trust = ISSUER, TRUST
    base, target = _list(issuer, deny_trust, 3, old), _list(issuer, deny_trust, 5, new)
    delta = DenyDelta.load(sign_deny_delta(issuer, base, target), deny_trust)
    made = delta.apply(base)
    assert made.version == 5 and made.serials.tolist() == sorted(new)
    assert deny_list_etag(made) == deny_list_etag(target)   # the same list, the same tag
    assert DenyList.reload(made.raw, deny_trust).serials.tolist() == sorted(new)
    # From any other version it does not apply.
    with pytest.raises(errors.StaleUpdate):
        delta.apply(_list(issuer, deny_trust, 4, old))


def test_a_tampered_or_foreign_delta_is_refused(deny_trust: TrustStore,
                                                issuer: IssuerKey) -> None:
    base = _list(issuer, deny_trust, 1, {1, 2, 3})
    target = _list(issuer, deny_trust, 2, {2, 3, 4})
    signed = sign_deny_delta(issuer, base, target)
    forged = bytearray(signed)
    forged[-5] ^= 1
    with pytest.raises(errors.BadSignature):
        DenyDelta.load(bytes(forged), deny_trust)
    stranger = IssuerKey(b"\x42" * 32)
    other = TrustStore()
    other.add(stranger, roles=Role.CREDENTIALS)   # trusted, but not for deny lists
    with pytest.raises(errors.IssuerKeyRole):
        DenyDelta.load(sign_deny_delta(stranger, base, target), other)
    # Signed, but its digest names another list than the one it makes.
    wrong = DenyList(2, NOW + 2, issuer.kid, np.array([9], dtype=np.uint64), b"")
    lying = DenyDelta.load(sign_deny_delta(issuer, base, wrong), deny_trust)
    object.__setattr__(lying, "added", np.array([4], dtype=np.uint64))
    with pytest.raises(errors.MalformedMessage):
        lying.apply(base)
    assert serials_digest(target.serials) != serials_digest(wrong.serials)


@pytest.mark.usefixtures("each_store")
def test_publishing_signs_deltas_from_recent_versions_and_a_gateway_applies_them(
        tmp_path: Path, deny_trust: TrustStore, issuer: IssuerKey) -> None:
    with open_settlement(tmp_path / "s", deny_trust) as s:
        published = [s.publish_deny_list(issuer, NOW + v, revoke=range(v * 10, v * 10 + 3))[0]
                     for v in range(1, DENY_DELTAS + 4)]
        latest = len(published)
        assert s.deny_list_delta(latest) is None                       # held: nothing to send
        assert s.deny_list_delta(latest - DENY_DELTAS - 1) is None     # too far behind
        delta = s.deny_list_delta(latest - DENY_DELTAS)
        assert delta is not None
    policy = GatewayPolicy(deny_list_max_age=None)
    with Gateway(tmp_path / "gw", GatewayKey(b"\x31" * 32), deny_trust, policy) as gateway:
        gateway.update_deny_list(published[latest - DENY_DELTAS - 1], now=NOW + 100)
        applied = gateway.apply_deny_delta(delta, now=NOW + 100)
        assert applied.version == latest
        assert applied.serials.tolist() == DenyList.load(
            published[-1], deny_trust).serials.tolist()
        assert gateway.apply_deny_delta(delta, now=NOW + 100) is gateway.deny_list   # a retry
        # An older whole list does not replace it either.
        with pytest.raises(errors.StaleUpdate):
            gateway.update_deny_list(published[2], now=NOW + 100)
    # Reopened, the gateway reads the list the delta made back from its journal.
    with Gateway(tmp_path / "gw", GatewayKey(b"\x31" * 32), deny_trust, policy) as gateway:
        assert gateway.deny_list.version == latest
        assert (latest * 10 + 1) in gateway.deny_list
        assert deny_list_etag(gateway.deny_list) == deny_list_etag(
            DenyList.load(published[-1], deny_trust))
