"""qrpay: signed offline QR payment tokens.

Issue credentials with an IssuerKey, make tokens on the phone with a
TokenGenerator, verify them at the gateway with `verify` / `verify_batch`
against a TrustStore. `qrpay.backend` says whether the compiled core
("cython") or the pure-Python twin ("python") is in use.
"""

from qrpay._impl import backend
from qrpay._version import __version__
from qrpay.credential import ALL_SCENES, Credential, Scene
from qrpay.denylist import DenyList, sign_deny_list
from qrpay.errors import (
    AlreadyAccepted, BadDeviceSignature, BadIssuerSignature, BadSignature, ClockUntrusted,
    CredentialExpired, CredentialNotValid, CredentialNotYetValid, DenyListStale,
    InvalidArgument, InvalidKey, IssuerKeyNotValid, IssuerKeyRole, JournalUnavailable,
    MalformedCredential, MalformedMessage, MalformedText, MalformedToken, OverOfflineLimit,
    OverTransactionCap, QrPayError, Reason, Revoked, SceneMismatch, SceneNotAllowed,
    ScanRefused, StaleUpdate, TokenFromFuture, TokenNotFresh, TokenRejected, TokenStale,
    TooManyOfflineUses, UnknownKeyId, UnsupportedVersion, WrongLength,
)
from qrpay.gateway import Gateway, GatewayPolicy, Receipt, ScanResult
from qrpay.format import TOKEN_LEN
from qrpay.keys import (
    DeviceKey, DevicePublicKey, GatewayKey, GatewayPublicKey, IssuerKey, IssuerPublicKey,
    PublicKey, key_id,
)
from qrpay.qr import decode_text, encode_text
from qrpay.token import (
    DEFAULT_MAX_AGE, DEFAULT_SKEW, BatchResult, TokenGenerator, VerifiedToken,
    generate_batch, verify, verify_batch,
)
from qrpay.trust import Role, TrustedKey, TrustStore

__all__ = [
    "AlreadyAccepted", "ClockUntrusted", "DenyList", "DenyListStale", "Gateway",
    "GatewayPolicy", "JournalUnavailable", "MalformedMessage", "OverOfflineLimit",
    "OverTransactionCap", "Receipt", "Revoked", "ScanRefused", "ScanResult", "SceneMismatch",
    "StaleUpdate", "TooManyOfflineUses", "sign_deny_list",
    "ALL_SCENES", "DEFAULT_MAX_AGE", "DEFAULT_SKEW", "TOKEN_LEN",
    "BadDeviceSignature", "BadIssuerSignature", "BadSignature", "BatchResult",
    "Credential", "CredentialExpired", "CredentialNotValid", "CredentialNotYetValid",
    "DeviceKey", "DevicePublicKey", "GatewayKey", "GatewayPublicKey", "InvalidArgument",
    "InvalidKey", "IssuerKey", "IssuerKeyNotValid", "IssuerKeyRole", "IssuerPublicKey",
    "MalformedCredential", "MalformedText", "MalformedToken", "PublicKey", "QrPayError",
    "Reason", "Role", "Scene", "SceneNotAllowed", "TokenFromFuture", "TokenGenerator",
    "TokenNotFresh", "TokenRejected", "TokenStale", "TrustStore", "TrustedKey",
    "UnknownKeyId", "UnsupportedVersion", "VerifiedToken", "WrongLength", "__version__",
    "backend", "decode_text", "encode_text", "generate_batch", "key_id", "verify",
    "verify_batch",
]
