"""Gateway: every refusal reason, the deny list, trusted time, upload and
journal failures. (Crash durability: test_gateway_crash.py; random sequences
against a model: test_gateway_stateful.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qrpay import (
    Credential, DeviceKey, GatewayKey, IssuerKey, Reason, Role, Scene, TokenGenerator,
    TrustStore, errors, encode_text,
)
from qrpay._impl import core
from qrpay.denylist import DenyList, sign_deny_list
from qrpay.format import TAG_BATCH
from qrpay.gateway import DEFAULT_TRANSACTION_CAPS, Gateway, GatewayPolicy
from qrpay.wire import split_document, unpack_strict


@pytest.fixture
def gateway_key() -> GatewayKey:
    return GatewayKey(bytes(range(64, 96)))


def open_gateway(path: Path, key: GatewayKey, trust: TrustStore, **policy: object) -> Gateway:
    return Gateway(path, key, trust, GatewayPolicy(**policy))  # type: ignore[arg-type]


@pytest.fixture
def gateway(tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore,
            issuer: IssuerKey, now: int) -> Gateway:
    gw = open_gateway(tmp_path / "gw", gateway_key, deny_trust)
    gw.update_deny_list(sign_deny_list(issuer, 1, [], now), now)
    return gw


def refusal(gw: Gateway, token: bytes | str, amount: int, scene: Scene, now: int) -> Reason:
    with pytest.raises(errors.QrPayError) as info:
        gw.scan(token, amount, scene, now)
    return info.value.reason


# -- accepted ----------------------------------------------------------------------------

def test_scan_returns_a_journaled_receipt(gateway: Gateway, generator: TokenGenerator,
                                          now: int) -> None:
    receipt = gateway.scan(generator.make_text(Scene.BUS, now), 200, Scene.BUS, now)
    assert (receipt.account, receipt.serial, receipt.counter, receipt.amount) == (1001, 77, 1, 200)
    assert receipt.gateway == gateway.id and not receipt.duplicate
    [record] = gateway.records()
    assert record.seq == receipt.record and record.amount == 200 and record.gateway_time == now
    assert gateway.offline_spend(1001) == (200, 1)


def test_double_tap_returns_the_first_receipt_and_charges_nothing(
        gateway: Gateway, generator: TokenGenerator, now: int) -> None:
    token = generator.make(Scene.BUS, now)
    first = gateway.scan(token, 200, Scene.BUS, now)
    again = gateway.scan(token, 200, Scene.BUS, now + 2)
    assert again.duplicate and again._replace(duplicate=False) == first
    assert len(gateway.records()) == 1 and gateway.offline_spend(1001) == (200, 1)


# -- each refusal ---------------------------------------------------------------------------

def test_replay_with_other_bytes_is_already_accepted(gateway: Gateway, credential: Credential,
                                                     device: DeviceKey, now: int) -> None:
    gateway.scan(core.make_token(credential.raw, device._secret, now, 5, Scene.BUS), 100,
                 Scene.BUS, now)
    clone = core.make_token(credential.raw, device._secret, now + 1, 5, Scene.BUS)
    with pytest.raises(errors.AlreadyAccepted):
        gateway.scan(clone, 100, Scene.BUS, now + 1)


def test_revoked_credential(gateway: Gateway, issuer: IssuerKey, generator: TokenGenerator,
                            now: int) -> None:
    gateway.update_deny_list(sign_deny_list(issuer, 2, [77, 5, 900], now), now)
    assert refusal(gateway, generator.make(Scene.BUS, now), 100, Scene.BUS,
                   now) == Reason.REVOKED


def test_scene_mismatch(gateway: Gateway, generator: TokenGenerator, now: int) -> None:
    with pytest.raises(errors.SceneMismatch):
        gateway.scan(generator.make(Scene.METRO, now), 100, Scene.BUS, now)


def test_transaction_cap_per_scene(gateway: Gateway, generator: TokenGenerator, now: int) -> None:
    cap = DEFAULT_TRANSACTION_CAPS[Scene.BUS]
    assert refusal(gateway, generator.make(Scene.BUS, now), cap + 1, Scene.BUS,
                   now) == Reason.OVER_TRANSACTION_CAP
    assert gateway.scan(generator.make(Scene.BUS, now), cap, Scene.BUS, now).amount == cap


def test_offline_limit_is_cumulative_until_ack(gateway: Gateway, generator: TokenGenerator,
                                               now: int) -> None:
    # The credential's limit is 5000; clinic visits are capped at 50000 each.
    gateway.scan(generator.make(Scene.CLINIC, now), 3000, Scene.CLINIC, now)
    gateway.scan(generator.make(Scene.CLINIC, now), 2000, Scene.CLINIC, now)
    with pytest.raises(errors.OverOfflineLimit):
        gateway.scan(generator.make(Scene.CLINIC, now), 1, Scene.CLINIC, now)
    batch = gateway.export_batch(now=now)
    assert batch is not None
    gateway.ack(1)
    assert gateway.offline_spend(1001) == (0, 0)
    assert gateway.scan(generator.make(Scene.CLINIC, now), 1, Scene.CLINIC, now).amount == 1


def test_too_many_offline_uses(tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
                               generator: TokenGenerator, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, max_offline_uses=2, deny_list_max_age=None)
    gw.scan(generator.make(Scene.BUS, now), 10, Scene.BUS, now)
    gw.scan(generator.make(Scene.BUS, now), 10, Scene.BUS, now)
    assert refusal(gw, generator.make(Scene.BUS, now), 10, Scene.BUS,
                   now) == Reason.TOO_MANY_OFFLINE_USES


def test_stale_deny_list_applies_the_stricter_cap(tmp_path: Path, gateway_key: GatewayKey,
                                                  deny_trust: TrustStore, issuer: IssuerKey,
                                                  generator: TokenGenerator, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, deny_trust, deny_list_max_age=3600,
                      stale_transaction_cap=300)
    # No list at all is as stale as it gets.
    assert refusal(gw, generator.make(Scene.BUS, now), 301, Scene.BUS,
                   now) == Reason.DENY_LIST_STALE
    assert gw.scan(generator.make(Scene.BUS, now), 300, Scene.BUS, now).amount == 300
    gw.update_deny_list(sign_deny_list(issuer, 1, [], now - 3600), now)
    assert gw.scan(generator.make(Scene.BUS, now), 301, Scene.BUS, now).amount == 301
    later = now + 1
    with pytest.raises(errors.DenyListStale):
        gw.scan(generator.make(Scene.BUS, later), 301, Scene.BUS, later)


def test_verification_errors_pass_through(gateway: Gateway, generator: TokenGenerator,
                                          now: int) -> None:
    token = bytearray(generator.make(Scene.BUS, now))
    token[150] ^= 1
    assert refusal(gateway, bytes(token), 100, Scene.BUS, now) == Reason.BAD_DEVICE_SIGNATURE
    assert refusal(gateway, generator.make(Scene.BUS, now - 600), 100, Scene.BUS,
                   now) == Reason.TOKEN_STALE
    assert refusal(gateway, "QP:not base45!", 100, Scene.BUS, now) == Reason.MALFORMED_TEXT
    assert gateway.records() == []


def test_scan_batch_reports_each_token_and_commits_once(gateway: Gateway, credential: Credential,
                                                        device: DeviceKey,
                                                        generator: TokenGenerator,
                                                        now: int) -> None:
    good = [generator.make(Scene.BUS, now) for _ in range(3)]
    clone = core.make_token(credential.raw, device._secret, now + 1, 2, Scene.BUS)
    tokens: list[bytes | str] = [good[0], encode_text(good[1]), good[2], clone, good[0],
                                 b"short", generator.make(Scene.METRO, now)]
    result = gateway.scan_batch(tokens, [100, 100, 100, 100, 100, 100, 100], Scene.BUS, now)
    assert [Reason(r) for r in result.reasons] == [
        Reason.OK, Reason.OK, Reason.OK, Reason.ALREADY_ACCEPTED, Reason.OK,
        Reason.WRONG_LENGTH, Reason.SCENE_MISMATCH]
    receipts = result.receipts
    assert receipts[4] is not None and receipts[4].duplicate
    assert receipts[0] is not None and receipts[4].record == receipts[0].record
    assert [r is None for r in receipts] == [False, False, False, True, False, True, True]
    assert len(gateway.records()) == 3 and gateway.offline_spend(1001) == (300, 3)
    assert list(result.ok) == [True, True, True, False, True, False, False]


def test_bad_amounts_and_inputs(gateway: Gateway, generator: TokenGenerator, now: int) -> None:
    token = generator.make(Scene.BUS, now)
    for amounts in ([0], [-5], [2**32], [1.5], [1, 2]):
        with pytest.raises(errors.InvalidArgument):
            gateway.scan_batch([token], amounts, Scene.BUS, now)
    with pytest.raises(errors.InvalidArgument):
        gateway.scan_batch([12345], [1], Scene.BUS, now)  # type: ignore[list-item]
    assert gateway.records() == []


def test_policy_is_validated() -> None:
    with pytest.raises(errors.InvalidArgument):
        GatewayPolicy(max_offline_uses=0)
    with pytest.raises(errors.InvalidArgument):
        GatewayPolicy(transaction_caps={Scene.BUS: 100})
    with pytest.raises(errors.InvalidArgument):
        GatewayPolicy(skew=-1)


# -- trusted time ------------------------------------------------------------------------------

def test_clock_going_back_below_the_floor_is_refused(tmp_path: Path, gateway_key: GatewayKey,
                                                     trust: TrustStore,
                                                     generator: TokenGenerator,
                                                     now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, clock_tolerance=5, deny_list_max_age=None)
    gw.scan(generator.make(Scene.BUS, now), 100, Scene.BUS, now)
    gw.scan(generator.make(Scene.BUS, now - 5), 100, Scene.BUS, now - 5)  # within tolerance
    with pytest.raises(errors.ClockUntrusted):
        gw.scan(generator.make(Scene.BUS, now - 6), 100, Scene.BUS, now - 6)
    gw.close()
    reopened = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
    assert reopened.time_floor == now  # the floor is persisted with the journal
    with pytest.raises(errors.ClockUntrusted):
        reopened.scan_batch([generator.make(Scene.BUS, now - 60)], [100], Scene.BUS, now - 60)


# -- deny list --------------------------------------------------------------------------------

def test_deny_list_only_newer_and_valid_lists_apply(gateway: Gateway, issuer: IssuerKey,
                                                    now: int) -> None:
    gateway.update_deny_list(sign_deny_list(issuer, 5, [1, 2], now), now)
    with pytest.raises(errors.StaleUpdate):
        gateway.update_deny_list(sign_deny_list(issuer, 5, [3], now), now)
    with pytest.raises(errors.StaleUpdate):
        gateway.update_deny_list(sign_deny_list(issuer, 4, [3], now), now)
    rogue = IssuerKey.generate()
    with pytest.raises(errors.UnknownKeyId):
        gateway.update_deny_list(sign_deny_list(rogue, 9, [3], now), now)
    signed = sign_deny_list(issuer, 9, [3], now)
    _body, signature = split_document(signed)
    with pytest.raises(errors.BadSignature):
        gateway.update_deny_list(signed.replace(signature, bytes(64)), now)
    assert gateway.deny_list.version == 5 and 1 in gateway.deny_list and 3 not in gateway.deny_list


def test_deny_list_needs_the_deny_list_role(tmp_path: Path, gateway_key: GatewayKey,
                                            trust: TrustStore, issuer: IssuerKey,
                                            now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust)  # issuer trusted for credentials only
    with pytest.raises(errors.IssuerKeyRole):
        gw.update_deny_list(sign_deny_list(issuer, 1, [1], now), now)


def test_deny_list_survives_restart(tmp_path: Path, gateway_key: GatewayKey,
                                    deny_trust: TrustStore, issuer: IssuerKey, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, deny_trust)
    gw.update_deny_list(sign_deny_list(issuer, 3, [2**64 - 1, 10], now), now)
    gw.close()
    again = open_gateway(tmp_path, gateway_key, deny_trust)
    assert again.deny_list.version == 3 and len(again.deny_list) == 2
    assert list(again.deny_list.contains([10, 11, 2**64 - 1])) == [True, False, True]


@pytest.mark.parametrize("data", [b"", b"\x92", b"\x92\xc4\x01x\xc4\x01y", b"\xc1" * 10])
def test_malformed_deny_lists(gateway: Gateway, data: bytes, now: int) -> None:
    with pytest.raises(errors.MalformedMessage):
        gateway.update_deny_list(data, now)


def test_deny_list_document_checks(deny_trust: TrustStore, issuer: IssuerKey) -> None:
    with pytest.raises(errors.InvalidArgument):
        sign_deny_list(issuer, 0, [], 1)
    with pytest.raises(errors.InvalidArgument):
        sign_deny_list(issuer, 1, [-1], 1)
    assert len(DenyList.empty()) == 0 and 5 not in DenyList.empty()


# -- upload -----------------------------------------------------------------------------------

def test_export_is_stable_until_ack_and_signed(gateway: Gateway, gateway_key: GatewayKey,
                                               generator: TokenGenerator, now: int) -> None:
    assert gateway.export_batch(now=now) is None
    tokens = [generator.make(Scene.BUS, now) for _ in range(5)]
    gateway.scan_batch(tokens, [10] * 5, Scene.BUS, now)
    first = gateway.export_batch(max_records=3, now=now)
    assert first is not None and gateway.export_batch(max_records=3, now=now + 50) == first
    body, signature = split_document(first)
    gateway_key.public.verify(TAG_BATCH + body, signature)
    doc = unpack_strict(body)
    assert (doc["seq"], doc["first"], doc["last"]) == (1, 1, 3)
    assert [r[1] for r in doc["records"]] == tokens[:3]
    gateway.ack(1)
    state = (gateway.records(), gateway.offline_spend(1001))
    gateway.ack(1)  # again: nothing changes
    assert (gateway.records(), gateway.offline_spend(1001)) == state
    second = gateway.export_batch(max_records=3, now=now)
    assert second is not None and unpack_strict(split_document(second)[0])["first"] == 4
    assert len(gateway.records()) == 5  # nothing deleted
    with pytest.raises(errors.InvalidArgument):
        gateway.ack(99)
    with pytest.raises(errors.InvalidArgument):
        gateway.export_batch(max_records=0)
    assert set(doc) == {"v", "gateway", "seq", "first", "last", "created_at", "records"}


def test_state_is_rebuilt_from_the_journal(tmp_path: Path, gateway_key: GatewayKey,
                                           trust: TrustStore, credential: Credential,
                                           device: DeviceKey, generator: TokenGenerator,
                                           now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
    token = generator.make(Scene.BUS, now)
    gw.scan(token, 400, Scene.BUS, now)
    gw.close()
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
    assert gw.offline_spend(1001) == (400, 1)
    clone = core.make_token(credential.raw, device._secret, now + 1, 1, Scene.BUS)
    with pytest.raises(errors.AlreadyAccepted):
        gw.scan(clone, 400, Scene.BUS, now + 1)
    assert gw.scan(token, 400, Scene.BUS, now + 1).duplicate


def test_journal_belongs_to_one_gateway_key(tmp_path: Path, gateway_key: GatewayKey,
                                            trust: TrustStore) -> None:
    open_gateway(tmp_path, gateway_key, trust).close()
    with pytest.raises(errors.InvalidArgument):
        open_gateway(tmp_path, GatewayKey.generate(), trust)


# -- journal failures -------------------------------------------------------------------------

def test_full_disk_refuses_and_accepts_nothing(tmp_path: Path, gateway_key: GatewayKey,
                                               trust: TrustStore, generator: TokenGenerator,
                                               now: int) -> None:
    gateway = open_gateway(tmp_path, gateway_key, trust, max_offline_uses=1000,
                           deny_list_max_age=None)
    gateway.scan(generator.make(Scene.BUS, now), 100, Scene.BUS, now)
    db = gateway._journal._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # SQLite answers SQLITE_FULL from here on
    tokens = [generator.make(Scene.BUS, now) for _ in range(200)]
    with pytest.raises(errors.JournalUnavailable):
        gateway.scan_batch(tokens, [1] * 200, Scene.BUS, now)
    assert len(gateway.records()) == 1 and gateway.offline_spend(1001) == (100, 1)
    db.execute("PRAGMA max_page_count=1073741823")  # space again: the same tokens go through
    assert gateway.scan_batch(tokens, [1] * 200, Scene.BUS, now).ok.all()


def test_read_only_journal_refuses(gateway: Gateway, generator: TokenGenerator, now: int) -> None:
    gateway._journal._db.execute("PRAGMA query_only=ON")
    with pytest.raises(errors.JournalUnavailable):
        gateway.scan(generator.make(Scene.BUS, now), 100, Scene.BUS, now)
    gateway._journal._db.execute("PRAGMA query_only=OFF")
    assert gateway.records() == []


def test_corrupt_journal_is_unavailable(tmp_path: Path, gateway_key: GatewayKey,
                                        trust: TrustStore) -> None:
    (tmp_path / "journal.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(errors.JournalUnavailable):
        open_gateway(tmp_path, gateway_key, trust)


def test_directory_that_cannot_be_created(tmp_path: Path, gateway_key: GatewayKey,
                                          trust: TrustStore) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(errors.JournalUnavailable):
        open_gateway(tmp_path / "file" / "gw", gateway_key, trust)


def test_deny_lookups_agree_with_numpy() -> None:
    rng = np.random.default_rng(5)
    hay = np.unique(rng.integers(0, 2**63, size=1000, dtype=np.uint64))
    needles = np.concatenate([hay[::7], rng.integers(0, 2**63, size=500, dtype=np.uint64)])
    assert np.array_equal(core.sorted_contains(hay, needles), np.isin(needles, hay))


# -- review fixes ------------------------------------------------------------------------------

def test_one_process_per_directory(tmp_path: Path, gateway_key: GatewayKey,
                                   trust: TrustStore) -> None:
    first = open_gateway(tmp_path, gateway_key, trust)
    with pytest.raises(errors.JournalUnavailable, match="in use"):
        open_gateway(tmp_path, gateway_key, trust)
    first.close()
    open_gateway(tmp_path, gateway_key, trust).close()  # released on close


def test_a_refused_batch_does_not_move_the_time_floor(gateway: Gateway,
                                                      generator: TokenGenerator,
                                                      now: int) -> None:
    gateway.scan(generator.make(Scene.BUS, now), 100, Scene.BUS, now)
    far_future = now + 10 * 86_400  # a clock that jumped ahead, refusing everything
    result = gateway.scan_batch([b"junk"], [100], Scene.BUS, far_future)
    assert not result.ok.any() and gateway.time_floor == now
    assert gateway.scan(generator.make(Scene.BUS, now + 1), 100, Scene.BUS, now + 1).amount == 100


def test_a_deny_list_from_the_future_is_refused(gateway: Gateway, issuer: IssuerKey,
                                                now: int) -> None:
    with pytest.raises(errors.StaleUpdate):
        gateway.update_deny_list(sign_deny_list(issuer, 7, [1], now + 3600), now)
    assert gateway.deny_list.version == 1


def test_a_deny_list_issued_before_the_one_in_force_is_refused(gateway: Gateway,
                                                                issuer: IssuerKey,
                                                                now: int) -> None:
    # Newer by number, older by date: it would move trusted time back (issue 11).
    gateway.update_deny_list(sign_deny_list(issuer, 7, [1], now), now)
    with pytest.raises(errors.StaleUpdate, match="before the list in force"):
        gateway.update_deny_list(sign_deny_list(issuer, 8, [1, 2], now - 1), now)
    assert gateway.deny_list.version == 7 and 2 not in gateway.deny_list
    gateway.update_deny_list(sign_deny_list(issuer, 8, [1, 2], now), now)   # the same time is fine
    assert gateway.deny_list.version == 8


def test_unknown_scene_is_invalid_argument(gateway: Gateway, generator: TokenGenerator,
                                           now: int) -> None:
    with pytest.raises(errors.InvalidArgument):
        gateway.scan_batch([generator.make(Scene.BUS, now)], [1], 99, now)  # type: ignore[arg-type]


def test_stored_deny_list_still_denies_after_its_key_leaves_the_trust_store(
        tmp_path: Path, gateway_key: GatewayKey, issuer: IssuerKey, generator: TokenGenerator,
        now: int) -> None:
    both = TrustStore()
    both.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)
    gw = open_gateway(tmp_path, gateway_key, both)
    gw.update_deny_list(sign_deny_list(issuer, 4, [77], now), now)
    gw.close()
    credentials_only = TrustStore()
    credentials_only.add(issuer, roles=Role.CREDENTIALS)
    reopened = open_gateway(tmp_path, gateway_key, credentials_only)
    assert reopened.deny_list.version == 4
    assert refusal(reopened, generator.make(Scene.BUS, now), 100, Scene.BUS,
                   now) == Reason.REVOKED


def test_tampered_stored_deny_list_makes_the_journal_unavailable(
        tmp_path: Path, gateway_key: GatewayKey, deny_trust: TrustStore, issuer: IssuerKey,
        now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, deny_trust)
    gw.update_deny_list(sign_deny_list(issuer, 2, [77], now), now)
    raw = gw.deny_list.raw
    gw._journal.set("deny_list", raw[:-1] + bytes([raw[-1] ^ 1]))
    gw.close()
    with pytest.raises(errors.JournalUnavailable):
        open_gateway(tmp_path, gateway_key, deny_trust)


def test_ack_forgets_old_replay_state_but_freshness_still_refuses(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        generator: TokenGenerator, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
    token = generator.make(Scene.BUS, now)
    gw.scan(token, 100, Scene.BUS, now)
    later = now + 3600
    gw.scan(generator.make(Scene.BUS, later), 100, Scene.BUS, later)
    gw.export_batch(now=later)
    gw.ack(1)
    assert len(gw._accepted) == 1  # the old record left memory, the recent one stayed
    assert refusal(gw, token, 100, Scene.BUS, later) == Reason.TOKEN_STALE


def test_clone_of_an_old_acked_payment_after_restart_is_already_accepted(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore, credential: Credential,
        device: DeviceKey, now: int) -> None:
    # The old record leaves memory (acked, past the replay window): a fresh
    # clone of its (serial, counter) must still be refused by itself, not take
    # the whole batch down with the journal's unique key; after a restart too.
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
    gw.scan(core.make_token(credential.raw, device._secret, now, 7, Scene.BUS), 100,
            Scene.BUS, now)
    later = now + 7200
    gw.scan(core.make_token(credential.raw, device._secret, later, 8, Scene.BUS), 100,
            Scene.BUS, later)
    gw.export_batch(now=later)
    gw.ack(1)
    assert (credential.serial, 7) not in gw._accepted
    for attempt in range(2):
        at = later + 1 + attempt
        clone = core.make_token(credential.raw, device._secret, at, 7, Scene.BUS)
        honest = core.make_token(credential.raw, device._secret, at, 20 + attempt, Scene.BUS)
        result = gw.scan_batch([clone, honest], [100, 100], Scene.BUS, at)
        assert [Reason(r) for r in result.reasons] == [Reason.ALREADY_ACCEPTED, Reason.OK]
        gw.close()
        gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None)
        assert (credential.serial, 7) not in gw._accepted


# -- retention ---------------------------------------------------------------------------

def _batch_seqs(data: bytes | None) -> tuple[int, int, int]:
    assert data is not None
    doc = unpack_strict(split_document(data)[0])
    return doc["seq"], doc["first"], doc["last"]


def test_ack_prunes_old_acknowledged_payments_and_numbering_carries_on(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        generator: TokenGenerator, now: int) -> None:
    policy = {"deny_list_max_age": None, "retention": 600}
    gw = open_gateway(tmp_path, gateway_key, trust, **policy)
    old = [generator.make(Scene.BUS, now) for _ in range(3)]
    gw.scan_batch(old, [10, 20, 30], Scene.BUS, now)
    assert _batch_seqs(gw.export_batch(max_records=2, now=now)) == (1, 1, 2)
    gw.ack(1)                                   # acked, but younger than the retention
    assert [r.seq for r in gw.records()] == [1, 2, 3]
    later = now + 3600
    gw.scan(generator.make(Scene.BUS, later), 40, Scene.BUS, later)
    assert _batch_seqs(gw.export_batch(now=later)) == (2, 3, 4)
    gw.ack(2)       # batch 1 is all older than the retention; batch 2 holds a recent one
    assert [r.seq for r in gw.records()] == [3, 4]
    assert gw.prune() == 0                      # nothing more to do
    gw.close()

    gw = open_gateway(tmp_path, gateway_key, trust, **policy)
    assert [r.seq for r in gw.records()] == [3, 4] and gw.offline_spend(1001) == (0, 0)
    receipt = gw.scan(generator.make(Scene.BUS, later + 5), 50, Scene.BUS, later + 5)
    assert receipt.record == 5
    assert _batch_seqs(gw.export_batch(now=later + 5)) == (3, 5, 5)
    # A pruned payment's token: stale, never a new payment.
    assert refusal(gw, old[0], 10, Scene.BUS, later + 5) == Reason.TOKEN_STALE


def test_pruning_deletes_everything_acked_and_forgets_nothing_it_needs(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        generator: TokenGenerator, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None, retention=0)
    token = generator.make(Scene.BUS, now)
    gw.scan(token, 10, Scene.BUS, now)
    gw.export_batch(now=now)
    gw.ack(1)
    # retention=0 still keeps a payment for the replay window: its double tap works.
    assert len(gw.records()) == 1 and gw.scan(token, 10, Scene.BUS, now + 1).duplicate
    later = now + gw.policy.replay_window + 1
    gw.scan(generator.make(Scene.BUS, later), 10, Scene.BUS, later)
    gw.export_batch(now=later)
    gw.ack(2)                 # the floor moved past record 1's window: ack prunes it
    assert [r.seq for r in gw.records()] == [2] and gw.prune() == 0
    gw.scan(generator.make(Scene.BUS, later + 200), 10, Scene.BUS, later + 200)
    gw.export_batch(now=later + 200)
    gw.ack(3)
    assert [r.seq for r in gw.records()] == [3]
    gw.close()

    # Nothing left but record 3, which a restart with the floor moved on prunes
    # too: numbering still carries on. A wider freshness window cannot bring a
    # forgotten token back either.
    wide = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None, retention=0,
                        max_age=3 * 86_400)
    wide.scan(generator.make(Scene.BUS, later + 300), 10, Scene.BUS, later + 300)
    assert _batch_seqs(wide.export_batch(now=later + 300)) == (4, 4, 4)
    wide.ack(4)
    wide.close()
    wide = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None, retention=0,
                        max_age=3 * 86_400)
    assert wide.prune() == 0 and [r.seq for r in wide.records()] == [3, 4]
    assert refusal(wide, token, 10, Scene.BUS, later + 300) == Reason.TOKEN_STALE
    # Prune with the wide window's own horizon (3 days): all of it, this time.
    far = later + 4 * 86_400
    wide.scan(generator.make(Scene.BUS, far), 10, Scene.BUS, far)
    assert _batch_seqs(wide.export_batch(now=far)) == (5, 5, 5)
    wide.ack(5)
    assert [r.seq for r in wide.records()] == [5]
    wide.close()
    wide = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None, retention=0,
                        max_age=3 * 86_400)
    assert wide.scan(generator.make(Scene.BUS, far + 1), 10, Scene.BUS, far + 1).record == 6
    assert _batch_seqs(wide.export_batch(now=far + 1)) == (6, 6, 6)


def test_unacknowledged_payments_are_never_pruned(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        generator: TokenGenerator, now: int) -> None:
    gw = open_gateway(tmp_path, gateway_key, trust, deny_list_max_age=None, retention=0)
    for hour in range(4):
        t = now + 3600 * hour
        gw.scan(generator.make(Scene.BUS, t), 10, Scene.BUS, t)
    assert _batch_seqs(gw.export_batch(max_records=1, now=now)) == (1, 1, 1)   # not acked
    assert gw.prune() == 0 and len(gw.records()) == 4
    gw.ack(1)
    assert [r.seq for r in gw.records()] == [2, 3, 4]    # only the acked batch went
    assert _batch_seqs(gw.export_batch(max_records=2, now=now)) == (2, 2, 3)
    assert gw.prune() == 0 and len(gw.records()) == 3


def test_retention_is_validated() -> None:
    with pytest.raises(errors.InvalidArgument):
        GatewayPolicy(retention=-1)
    assert GatewayPolicy(retention=0).prune_after == GatewayPolicy().replay_window
    assert GatewayPolicy().prune_after == 7 * 86_400


@pytest.mark.usefixtures("each_store")
def test_settlement_sees_one_gapless_stream_across_pruning_and_restarts(
        tmp_path: Path, gateway_key: GatewayKey, trust: TrustStore,
        generator: TokenGenerator, now: int) -> None:
    from qrpay.settlement import IngestStatus
    from stores import open_settlement
    settlement = open_settlement(tmp_path / "settlement", trust, [gateway_key.public])
    policy = {"deny_list_max_age": None, "retention": 0}
    gw = open_gateway(tmp_path / "gw", gateway_key, trust, **policy)
    charged = 0
    for hour in range(12):
        t = now + 3600 * hour
        amounts = [10 + hour, 20 + hour]
        gw.scan_batch([generator.make(Scene.BUS, t) for _ in amounts], amounts, Scene.BUS, t)
        charged += sum(amounts)
        batch = gw.export_batch(max_records=3, now=t)
        assert batch is not None
        result = settlement.ingest(batch)
        assert result.status is IngestStatus.APPLIED
        if hour % 3 == 2:      # lost acks: the same batch comes again, then is acked
            gw.close()
            gw = open_gateway(tmp_path / "gw", gateway_key, trust, **policy)
            again = gw.export_batch(max_records=3, now=t)
            assert again == batch and settlement.ingest(again).status is IngestStatus.EXISTS
        gw.ack(result.seq)
        assert len(gw.records()) <= 6     # pruned as it goes
    while (batch := gw.export_batch(now=now + 86_400)) is not None:
        gw.ack(settlement.ingest(batch).seq)
    report = settlement.report()
    assert report.findings == [] and report.charged_total == charged
    assert report.charge_of(1001) == charged
