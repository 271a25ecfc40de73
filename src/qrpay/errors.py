"""One exception hierarchy and one Reason enum, shared by the core and Python.

The compiled core and its pure-Python twin return a Reason code (a small int)
and never raise for a rejected token; `raise_for` is the one place that turns a
code into an exception. Every exception carries `.reason`, so a caller can tell
an expired token from a forged one without parsing messages.
"""

from __future__ import annotations

import enum
from typing import NoReturn


class Reason(enum.IntEnum):
    """Why a token was accepted (OK) or rejected. Values are stable: they are
    stored in journals and returned in batch arrays."""

    OK = 0
    # Token shape, in check order.
    WRONG_LENGTH = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_KID = 3
    ISSUER_KEY_ROLE = 4
    ISSUER_KEY_NOT_VALID = 5
    BAD_ISSUER_SIGNATURE = 6
    BAD_DEVICE_SIGNATURE = 7
    CREDENTIAL_NOT_YET_VALID = 8
    CREDENTIAL_EXPIRED = 9
    TOKEN_FROM_FUTURE = 10
    TOKEN_STALE = 11
    SCENE_NOT_ALLOWED = 12
    # Gateway checks after verification, in check order.
    REVOKED = 13
    SCENE_MISMATCH = 14
    ALREADY_ACCEPTED = 15
    OVER_TRANSACTION_CAP = 16
    DENY_LIST_STALE = 17
    OVER_OFFLINE_LIMIT = 18
    TOO_MANY_OFFLINE_USES = 19
    # Gateway conditions that refuse every scan until fixed.
    CLOCK_UNTRUSTED = 20
    JOURNAL_UNAVAILABLE = 21
    # Inputs that are not tokens.
    MALFORMED_TEXT = 30
    INVALID_KEY = 31
    INVALID_ARGUMENT = 32
    BAD_SIGNATURE = 33
    MALFORMED_CREDENTIAL = 34
    MALFORMED_MESSAGE = 35
    STALE_UPDATE = 36
    UNKNOWN_GATEWAY = 37
    STORE_UNAVAILABLE = 38
    CONFLICT = 39
    ARCHIVE_UNAVAILABLE = 40
    PERIOD_CLOSED = 41


class QrPayError(Exception):
    """Base of every error qrpay raises on purpose."""

    reason: Reason = Reason.INVALID_ARGUMENT

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.reason.name.lower().replace("_", " "))


class InvalidArgument(QrPayError, ValueError):
    reason = Reason.INVALID_ARGUMENT


class InvalidKey(QrPayError, ValueError):
    """A key's bytes or text are the wrong length, role or not a safe point."""

    reason = Reason.INVALID_KEY


class BadSignature(QrPayError, ValueError):
    """A signature does not verify."""

    reason = Reason.BAD_SIGNATURE


class MalformedCredential(QrPayError, ValueError):
    reason = Reason.MALFORMED_CREDENTIAL


class TokenRejected(QrPayError, ValueError):
    """A token failed verification; `.reason` says which check."""


class MalformedToken(TokenRejected):
    """The bytes are not a token this library can read."""

    reason = Reason.WRONG_LENGTH


class WrongLength(MalformedToken):
    reason = Reason.WRONG_LENGTH


class UnsupportedVersion(MalformedToken):
    reason = Reason.UNSUPPORTED_VERSION


class MalformedText(MalformedToken):
    """The text form has a wrong prefix or is not valid Base45."""

    reason = Reason.MALFORMED_TEXT


class UnknownKeyId(TokenRejected):
    reason = Reason.UNKNOWN_KID


class IssuerKeyRole(TokenRejected):
    """The kid names a trusted key that may not issue credentials."""

    reason = Reason.ISSUER_KEY_ROLE


class IssuerKeyNotValid(TokenRejected):
    """The issuer key is outside its validity window."""

    reason = Reason.ISSUER_KEY_NOT_VALID


class BadIssuerSignature(TokenRejected, BadSignature):
    reason = Reason.BAD_ISSUER_SIGNATURE


class BadDeviceSignature(TokenRejected, BadSignature):
    reason = Reason.BAD_DEVICE_SIGNATURE


class CredentialNotValid(TokenRejected):
    """The credential is outside its validity window."""


class CredentialNotYetValid(CredentialNotValid):
    reason = Reason.CREDENTIAL_NOT_YET_VALID


class CredentialExpired(CredentialNotValid):
    reason = Reason.CREDENTIAL_EXPIRED


class TokenNotFresh(TokenRejected):
    """issued_at is outside the freshness window."""


class TokenFromFuture(TokenNotFresh):
    reason = Reason.TOKEN_FROM_FUTURE


class TokenStale(TokenNotFresh):
    reason = Reason.TOKEN_STALE


class SceneNotAllowed(TokenRejected):
    reason = Reason.SCENE_NOT_ALLOWED


class ScanRefused(QrPayError, ValueError):
    """A verified token that this gateway may not accept; `.reason` says why."""


class Revoked(ScanRefused):
    """The credential's serial is on the deny list."""

    reason = Reason.REVOKED


class SceneMismatch(ScanRefused):
    """The token was made for another scene than the one scanning it."""

    reason = Reason.SCENE_MISMATCH


class AlreadyAccepted(ScanRefused):
    """This (credential serial, counter) was accepted before: a replay."""

    reason = Reason.ALREADY_ACCEPTED


class OverTransactionCap(ScanRefused):
    reason = Reason.OVER_TRANSACTION_CAP


class DenyListStale(ScanRefused):
    """The deny list is older than the policy allows and the amount is above
    the stricter cap that applies then."""

    reason = Reason.DENY_LIST_STALE


class OverOfflineLimit(ScanRefused):
    """The account's offline spend since the last acknowledged upload would
    exceed its credential's limit."""

    reason = Reason.OVER_OFFLINE_LIMIT


class TooManyOfflineUses(ScanRefused):
    reason = Reason.TOO_MANY_OFFLINE_USES


class ClockUntrusted(QrPayError, RuntimeError):
    """The clock is behind the gateway's persisted time floor."""

    reason = Reason.CLOCK_UNTRUSTED


class JournalUnavailable(QrPayError, OSError):
    """The journal cannot be written (disk full, read-only, corrupt): nothing
    is accepted that could not be journaled."""

    reason = Reason.JOURNAL_UNAVAILABLE


class MalformedMessage(QrPayError, ValueError):
    """A msgpack document (batch, deny list) is not one this library reads."""

    reason = Reason.MALFORMED_MESSAGE


class StaleUpdate(QrPayError, ValueError):
    """An update (deny list) is not newer than what is already applied."""

    reason = Reason.STALE_UPDATE


class UnknownGateway(QrPayError, ValueError):
    """A batch signed by a gateway key that settlement does not know."""

    reason = Reason.UNKNOWN_GATEWAY


class StoreUnavailable(QrPayError, OSError):
    """The settlement store cannot be read or written."""

    reason = Reason.STORE_UNAVAILABLE


class Conflict(QrPayError, ValueError):
    """Other content is already stored under the same identity (a repayment's
    reference): nothing was stored."""

    reason = Reason.CONFLICT


class ArchiveUnavailable(QrPayError, OSError):
    """The archive of closed periods cannot be written or read back as
    written (a file missing, altered or of an unknown format)."""

    reason = Reason.ARCHIVE_UNAVAILABLE


class PeriodClosed(QrPayError, ValueError):
    """The period asked for is closed (immutable) or the cut is not after the
    last one: nothing changed."""

    reason = Reason.PERIOD_CLOSED


_BY_REASON: dict[Reason, type[QrPayError]] = {}
for _cls in (
    WrongLength, UnsupportedVersion, UnknownKeyId, IssuerKeyRole, IssuerKeyNotValid,
    BadIssuerSignature, BadDeviceSignature, CredentialNotYetValid, CredentialExpired,
    TokenFromFuture, TokenStale, SceneNotAllowed, MalformedText, InvalidKey,
    InvalidArgument, BadSignature, MalformedCredential, Revoked, SceneMismatch,
    AlreadyAccepted, OverTransactionCap, DenyListStale, OverOfflineLimit, TooManyOfflineUses,
    ClockUntrusted, JournalUnavailable, MalformedMessage, StaleUpdate, UnknownGateway,
    StoreUnavailable, Conflict, ArchiveUnavailable, PeriodClosed,
):
    _BY_REASON[_cls.reason] = _cls


def error_class(reason: int) -> type[QrPayError]:
    """The exception class raised for a reason code."""
    return _BY_REASON[Reason(reason)]


def raise_for(reason: int, message: str | None = None) -> NoReturn:
    """The one place a core reason code becomes an exception."""
    raise error_class(reason)(message)
