"""Offline tokens: made on the phone, verified at the gateway.

A token is the credential plus issued_at, a counter that only goes up and the
scene, signed by the device key (docs/FORMAT.md). `verify` checks one token
and raises a typed error; `verify_batch` checks many in the core with the GIL
released and returns arrays of reason codes instead of raising.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from qrpay._impl import core
from qrpay.credential import Credential, Scene, mask_to_scenes
from qrpay.errors import InvalidArgument, InvalidKey, Reason, raise_for
from qrpay.format import (
    CRED_DEVICE_KEY, CRED_LEN, CRED_SCENES, CRED_STRUCT, MAX_TIME, MAX_WINDOW, PUBLIC_KEY_LEN,
    SECRET_KEY_LEN, SEED_LEN, TOKEN_DTYPE, TOKEN_FIELDS_STRUCT, TOKEN_LEN, U32_MAX,
)
from qrpay.keys import DeviceKey
from qrpay.qr import decode_text, encode_text
from qrpay.trust import TrustStore

DEFAULT_MAX_AGE = 60
"""Seconds a token stays fresh after issued_at (plus the skew)."""
DEFAULT_SKEW = 30
"""Seconds the phone's and the gateway's clocks may disagree, either way."""

TokenInput = Union[bytes, bytearray, memoryview, str]
_SCENE_BY_VALUE = {int(s): s for s in Scene}


def _now(now: float | None) -> int:
    t = int(time.time()) if now is None else int(now)
    if not 0 <= t <= MAX_TIME:
        raise InvalidArgument(f"now must be Unix seconds in [0, 2**40], got {t}")
    return t


def _check_window(max_age: int, skew: int) -> None:
    if not (0 <= max_age <= MAX_WINDOW and 0 <= skew <= MAX_WINDOW):
        raise InvalidArgument("max_age and skew are seconds in [0, 2**32]")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signatures, windows, freshness and scene all checked out."""

    account: int
    serial: int
    counter: int
    issued_at: int
    scene: Scene
    limit: int
    scenes: frozenset[Scene]
    not_before: int
    not_after: int
    kid: bytes
    device_key: bytes
    raw: bytes

    @classmethod
    def _from_checked(cls, raw: bytes) -> VerifiedToken:
        (_v, kid, account, serial, device_key, not_before, not_after, limit, mask,
         _sig) = CRED_STRUCT.unpack_from(raw)
        issued_at, counter, scene = TOKEN_FIELDS_STRUCT.unpack_from(raw, CRED_LEN)
        return cls(account, serial, counter, issued_at, _SCENE_BY_VALUE[scene], limit,
                   mask_to_scenes(mask), not_before, not_after, kid, device_key, raw)


def verify(token: TokenInput, trust: TrustStore, now: float | None = None, *,
           max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW) -> VerifiedToken:
    """Verify one token (bytes, or its 'QP:' text form) at time `now`
    (Unix seconds, default: the clock). Raises a TokenRejected subclass whose
    `.reason` names the first check that failed."""
    _check_window(max_age, skew)
    raw = decode_text(token) if isinstance(token, str) else bytes(token)
    reason = trust.verifier().verify_one(raw, _now(now), max_age, skew)
    if reason != Reason.OK:
        raise_for(reason)
    return VerifiedToken._from_checked(raw)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Per-token outcome of verify_batch. `reasons[i] == 0` (Reason.OK) means
    accepted; the decoded fields are zero for every rejected token."""

    reasons: npt.NDArray[np.uint8]
    account: npt.NDArray[np.uint64]
    serial: npt.NDArray[np.uint64]
    counter: npt.NDArray[np.uint32]
    issued_at: npt.NDArray[np.uint32]
    scene: npt.NDArray[np.uint8]
    limit: npt.NDArray[np.uint32]

    @property
    def ok(self) -> npt.NDArray[np.bool_]:
        return np.equal(self.reasons, Reason.OK)

    def __len__(self) -> int:
        return len(self.reasons)

    def counts(self) -> dict[Reason, int]:
        values, counts = np.unique(self.reasons, return_counts=True)
        return {Reason(int(v)): int(c) for v, c in zip(values, counts)}


def as_token_array(tokens: Sequence[bytes] | npt.NDArray[np.uint8]
                   ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Tokens as an (n, TOKEN_LEN) uint8 array plus each one's real length
    (tokens of another length are kept as a row of zeros and rejected)."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_LEN or tokens.dtype != np.uint8:
            raise InvalidArgument(f"a token array is (n, {TOKEN_LEN}) uint8")
        array = np.ascontiguousarray(tokens)
        return array, np.full(len(array), TOKEN_LEN, dtype=np.int64)
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    if np.all(lengths == TOKEN_LEN):
        # A bytearray join is writable already: one copy of the batch, not two.
        joined = bytearray().join(tokens)
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, TOKEN_LEN), lengths
    array = np.zeros((len(tokens), TOKEN_LEN), dtype=np.uint8)
    for i, t in enumerate(tokens):
        if len(t) == TOKEN_LEN:
            array[i] = np.frombuffer(bytes(t), dtype=np.uint8)
    return array, lengths


def verify_batch(tokens: Sequence[bytes] | npt.NDArray[np.uint8], trust: TrustStore,
                 now: float | npt.NDArray[np.integer[Any]] | None = None, *,
                 max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW,
                 threads: int = 1,
                 lengths: npt.NDArray[np.int64] | None = None) -> BatchResult:
    """Verify many tokens at once, split across `threads` with the GIL
    released. `now` is one time for all, or an array with one time per token.
    `lengths`, with a token array from `as_token_array`, is each row's real
    length (rows of another length are WRONG_LENGTH). Never raises for a bad
    token: see `BatchResult.reasons`."""
    _check_window(max_age, skew)
    if threads < 1:
        raise InvalidArgument("threads must be at least 1")
    array, real_lengths = as_token_array(tokens)
    if lengths is None:
        lengths = real_lengths
    elif np.shape(lengths) != (len(array),):
        raise InvalidArgument("one length per token")
    times = now if isinstance(now, np.ndarray) else _now(now)
    reasons = np.asarray(trust.verifier().verify_many(
        array, np.ascontiguousarray(lengths, dtype=np.int64), times, max_age, skew, threads))
    fields = array.view(TOKEN_DTYPE).reshape(-1)
    rejected = reasons != Reason.OK

    def column(name: str) -> Any:
        out = fields[name].copy()
        out[rejected] = 0
        return out

    return BatchResult(reasons, column("account"), column("serial"), column("counter"),
                       column("issued_at"), column("scene"), column("limit"))


class TokenGenerator:
    """Makes tokens for one credential on the phone, offline. Each token takes
    the next counter value; the counter never goes back, so persist
    `generator.counter` and pass it back in after a restart."""

    def __init__(self, credential: Credential, device_key: DeviceKey, counter: int = 0) -> None:
        if not isinstance(device_key, DeviceKey):
            raise InvalidKey("tokens are signed with a DeviceKey")
        if device_key.public.to_bytes() != credential.device_key:
            raise InvalidKey("the device key does not match the credential's device key")
        if not 0 <= counter <= U32_MAX:
            raise InvalidArgument("counter must fit in 32 bits")
        self._credential = credential.raw
        self._secret = device_key._secret
        self._counter = counter
        self._scenes = credential.scenes

    @property
    def counter(self) -> int:
        """The counter of the last token made (0 before the first)."""
        return self._counter

    def make(self, scene: Scene, now: float | None = None) -> bytes:
        """A fresh signed token for `scene`, issued at `now` (default: the clock)."""
        if scene not in self._scenes:
            raise InvalidArgument(f"the credential does not allow {Scene(scene).name}")
        if self._counter >= U32_MAX:
            raise InvalidArgument("the token counter is exhausted; issue a new credential")
        issued_at = _now(now)
        if issued_at > U32_MAX:     # _now already refused anything below 0
            raise InvalidArgument("issued_at must fit in 32 bits")
        self._counter += 1
        return core.make_token(self._credential, self._secret, issued_at, self._counter,
                               int(scene))

    def make_text(self, scene: Scene, now: float | None = None) -> str:
        return encode_text(self.make(scene, now))


def generate_batch(credentials: Sequence[Credential], device_keys: Sequence[DeviceKey],
                   scenes: Sequence[Scene] | npt.NDArray[np.uint8],
                   counters: Sequence[int] | npt.NDArray[np.uint32],
                   now: float | npt.NDArray[np.uint32] | None = None,
                   threads: int = 1) -> npt.NDArray[np.uint8]:
    """Sign one token per (credential, device key) row in the core, without
    the GIL, across `threads`. Returns an (n, TOKEN_LEN) uint8 array. The
    caller owns the counters: each must be above the device's last one."""
    n = len(credentials)
    if len(device_keys) != n:
        raise InvalidArgument("one device key per credential")
    if threads < 1:
        raise InvalidArgument("threads must be at least 1")
    creds = np.frombuffer(b"".join(c.raw for c in credentials), dtype=np.uint8).reshape(n, CRED_LEN)
    keys = np.frombuffer(b"".join(k._secret for k in device_keys),
                         dtype=np.uint8).reshape(n, SECRET_KEY_LEN)
    device_public = creds[:, CRED_DEVICE_KEY:CRED_DEVICE_KEY + PUBLIC_KEY_LEN]
    if not np.array_equal(keys[:, SEED_LEN:], device_public):
        raise InvalidKey("a device key does not match its credential's device key")
    scene_arr = _u32_column("scenes", scenes, n, 15)
    masks = creds[:, CRED_SCENES].astype(np.int64) | (creds[:, CRED_SCENES + 1].astype(np.int64) << 8)
    if np.any((masks >> scene_arr) & 1 == 0):
        raise InvalidArgument("every scene must be one its credential allows")
    issued = _u32_column("now", now if isinstance(now, np.ndarray) else _now(now), n, U32_MAX)
    return core.make_tokens(creds, keys, issued.astype(np.uint32),
                            _u32_column("counters", counters, n, U32_MAX).astype(np.uint32),
                            scene_arr.astype(np.uint8), threads)


def _u32_column(name: str, values: Any, n: int, top: int) -> npt.NDArray[np.int64]:
    # Checked before any narrowing cast, so 256 never wraps to scene 0.
    array = np.broadcast_to(np.asarray(values), (n,))
    if array.dtype.kind not in "iu":
        raise InvalidArgument(f"{name} must be integers")
    if n and (array.min() < 0 or array.max() > top):
        raise InvalidArgument(f"{name} must be in [0, {top}]")
    return np.ascontiguousarray(array, dtype=np.int64)
