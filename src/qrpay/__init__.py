"""qrpay: signed offline QR payment tokens.

Issue credentials with an IssuerKey, make tokens on the phone with a
TokenGenerator, verify them at the gateway with `verify` / `verify_batch`
against a TrustStore. `qrpay.backend` says whether the compiled core
("cython") or the pure-Python twin ("python") is in use.
"""

from qrpay._impl import backend
from qrpay._version import __version__
from qrpay.credential import ALL_SCENES, Credential, Scene
from qrpay.errors import (
    BadDeviceSignature, BadIssuerSignature, BadSignature, CredentialExpired,
    CredentialNotValid, CredentialNotYetValid, InvalidArgument, InvalidKey,
    IssuerKeyNotValid, IssuerKeyRole, MalformedCredential, MalformedText, MalformedToken,
    QrPayError, Reason, SceneNotAllowed, TokenFromFuture, TokenNotFresh, TokenRejected,
    TokenStale, UnknownKeyId, UnsupportedVersion, WrongLength,
)
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
