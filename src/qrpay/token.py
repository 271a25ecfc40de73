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
from typing import Any, Union, cast

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay._impl import core
from qrpay.credential import Credential, Scene, as_scene, mask_to_scenes
from qrpay.errors import InvalidArgument, InvalidKey, MalformedText, Reason, raise_for
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
_PLAIN_ITEMS = frozenset({bytes, bytearray})   # len() is the byte length
MALFORMED_TEXT_LENGTH = -1
"""The length `as_token_array` gives a text item that is not a token's text
form: verify_batch reports it as MALFORMED_TEXT."""


def _now(now: object) -> int:
    """`now` (default: the clock) as whole Unix seconds: an int or a finite
    float (Python or numpy) in [0, 2**40], truncated; anything else is
    InvalidArgument, never ValueError, OverflowError or TypeError."""
    if now is None:
        now = time.time()
    if type(now) is int and 0 <= now <= MAX_TIME:
        return now
    if not _args.is_time(now):
        raise InvalidArgument(f"now must be Unix seconds in [0, 2**40], not {now!r:.80}")
    return int(cast(float, now))


def _check_window(max_age: object, skew: object) -> tuple[int, int]:
    """max_age and skew as ints in [0, 2**32] (InvalidArgument otherwise)."""
    return (_args.integer("max_age", max_age, 0, MAX_WINDOW),
            _args.integer("skew", skew, 0, MAX_WINDOW))


def _check_trust(trust: object) -> TrustStore:
    if not isinstance(trust, TrustStore):
        raise InvalidArgument(f"trust must be a TrustStore, not {type(trust).__name__}")
    return trust


def _token_bytes(token: object) -> bytes:
    """One token for `verify`: bytes-like (anything with the buffer protocol,
    measured in bytes) or its 'QP:' text form. Never bytes(n) of an int n,
    never a copy of a buffer that cannot be a token."""
    if type(token) is bytes:
        return token
    if isinstance(token, str):
        return decode_text(token)
    raw, length = _measure(token, "a token")
    if raw is None:
        raise_for(Reason.WRONG_LENGTH, f"a token is {TOKEN_LEN} bytes, not {length}")
    return raw


def _measure(item: object, what: str) -> tuple[bytes | None, int]:
    """A batch item's bytes (None unless it is TOKEN_LEN long) and its length
    in bytes, MALFORMED_TEXT_LENGTH for text that is not a token's text form."""
    if isinstance(item, str):
        try:
            raw = decode_text(item)
        except MalformedText:
            return None, MALFORMED_TEXT_LENGTH
        return (raw if len(raw) == TOKEN_LEN else None), len(raw)
    try:
        view = memoryview(item)  # type: ignore[arg-type]
    except (TypeError, ValueError, BufferError):
        view = None
    if view is None or view.format == "O":   # no buffer, or one of object pointers
        raise InvalidArgument(f"{what} is bytes-like or its text form, not "
                              f"{type(item).__name__}")
    with view:
        if view.nbytes != TOKEN_LEN:
            return None, view.nbytes
        return view.tobytes(), TOKEN_LEN


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
    """Verify one token (bytes-like, or its 'QP:' text form) at time `now`
    (Unix seconds, default: the clock). Raises a TokenRejected subclass whose
    `.reason` names the first check that failed; InvalidArgument for an
    argument of the wrong type or range (a token that is neither bytes-like
    nor text, a NaN or bool `now`, a `max_age` that is not an int, ...)."""
    max_age, skew = _check_window(max_age, skew)
    verifier = _check_trust(trust).verifier()
    t = _now(now)
    raw = _token_bytes(token)
    reason = verifier.verify_one(raw, t, max_age, skew)
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


def as_token_array(tokens: Sequence[TokenInput] | npt.NDArray[np.uint8]
                   ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Tokens as a new (n, TOKEN_LEN) uint8 array (a copy: the caller's
    buffers are not read again) plus each one's real length in bytes. An item
    is bytes-like (measured in bytes, so a (204, 2) array is 408 bytes, not
    204) or its 'QP:' text form, decoded; a text that is not a token's text
    form has length MALFORMED_TEXT_LENGTH (-1). Rows of another length than
    TOKEN_LEN are zeros, and rejected. Anything else - None, a number, a
    bare str or bytes as the whole batch - is InvalidArgument."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_LEN or tokens.dtype != np.uint8:
            raise InvalidArgument(f"a token array is (n, {TOKEN_LEN}) uint8")
        array = np.array(tokens, order="C", copy=True)
        return array, np.full(len(array), TOKEN_LEN, dtype=np.int64)
    items = _token_items(tokens)
    n = len(items)
    if _PLAIN_ITEMS.issuperset(map(type, items)):
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=n)
        if np.all(lengths == TOKEN_LEN):
            # A bytearray join is writable already: one copy of the batch, not two.
            joined = bytearray().join(items)
            if len(joined) == n * TOKEN_LEN:   # else a bytearray was resized meanwhile
                return np.frombuffer(joined, dtype=np.uint8).reshape(n, TOKEN_LEN), lengths
    array = np.zeros((n, TOKEN_LEN), dtype=np.uint8)
    lengths = np.empty(n, dtype=np.int64)
    for i, item in enumerate(items):
        raw, lengths[i] = _measure(item, f"token {i}")
        if raw is not None:
            array[i] = np.frombuffer(raw, dtype=np.uint8)
    return array, lengths


def _token_items(tokens: object) -> Sequence[Any]:
    if isinstance(tokens, (str, bytes, bytearray, memoryview)):
        raise InvalidArgument("tokens is a sequence of tokens or an (n, 204) uint8 array, "
                              "not one token")
    if not isinstance(tokens, Sequence):
        raise InvalidArgument(f"tokens is a sequence of tokens or an (n, 204) uint8 array, "
                              f"not {type(tokens).__name__}")
    return tokens


def verify_batch(tokens: Sequence[TokenInput] | npt.NDArray[np.uint8], trust: TrustStore,
                 now: float | npt.NDArray[np.integer[Any]] | None = None, *,
                 max_age: int = DEFAULT_MAX_AGE, skew: int = DEFAULT_SKEW,
                 threads: int = 1,
                 lengths: npt.NDArray[np.int64] | None = None) -> BatchResult:
    """Verify many tokens at once, split across `threads` with the GIL
    released. `tokens` is a sequence of tokens, each bytes-like (measured in
    bytes) or its 'QP:' text form (decoded as `Gateway.scan_batch` does; a
    text that does not decode is MALFORMED_TEXT), or an (n, TOKEN_LEN) uint8
    array. `now` is one time for all, or an integer array with one time per
    token. `lengths`, with a token array from `as_token_array`, is each row's
    real length (rows of another length are WRONG_LENGTH, -1 MALFORMED_TEXT).
    `threads` is 1 to 256, and each thread takes at least 8 tokens.

    The tokens are copied before they are verified, and the fields returned
    are read from that copy: a thread that rewrites the caller's array or
    buffers during the call cannot get a row reported OK with bytes that
    were not verified. Never raises for a bad token: see
    `BatchResult.reasons`; raises InvalidArgument for a bad argument (None or
    a number as a token, a bare str or bytes as the whole batch, a NaN `now`,
    threads out of range, ...)."""
    max_age, skew = _check_window(max_age, skew)
    count = _args.threads(threads)
    verifier = _check_trust(trust).verifier()
    array, real_lengths = as_token_array(tokens)     # a copy of the caller's tokens
    if lengths is None:
        lengths = real_lengths
    elif not isinstance(tokens, np.ndarray) or not isinstance(lengths, np.ndarray):
        raise InvalidArgument("lengths are an array, and go with a token array "
                              "(see as_token_array)")
    else:
        lengths = lengths.copy()
    times = now if isinstance(now, np.ndarray) else _now(now)
    # The core checks (and copies) lengths and per-token times as it does for any caller.
    reasons = np.asarray(verifier.verify_many(array, lengths, times, max_age, skew, count))
    if len(reasons) and lengths.min() < 0:
        reasons[lengths == MALFORMED_TEXT_LENGTH] = Reason.MALFORMED_TEXT
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
        if not isinstance(credential, Credential):
            raise InvalidArgument("tokens are made for a Credential")
        if not isinstance(device_key, DeviceKey):
            raise InvalidKey("tokens are signed with a DeviceKey")
        if device_key.public.to_bytes() != credential.device_key:
            raise InvalidKey("the device key does not match the credential's device key")
        self._counter = _args.integer("counter", counter, 0, U32_MAX)
        self._credential = credential.raw
        self._secret = device_key._secret
        self._scenes = credential.scenes

    @property
    def counter(self) -> int:
        """The counter of the last token made (0 before the first)."""
        return self._counter

    def make(self, scene: Scene, now: float | None = None) -> bytes:
        """A fresh signed token for `scene`, issued at `now` (default: the clock)."""
        scene = as_scene(scene)
        if scene not in self._scenes:
            raise InvalidArgument(f"the credential does not allow {scene.name}")
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
    credentials, device_keys = _items(credentials), _items(device_keys)
    n = len(credentials)
    if len(device_keys) != n:
        raise InvalidArgument("one device key per credential")
    count = _args.threads(threads)
    if not all(isinstance(c, Credential) for c in credentials):
        raise InvalidArgument("credentials are Credential objects")
    if not all(isinstance(k, DeviceKey) for k in device_keys):
        raise InvalidKey("tokens are signed with DeviceKeys")
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
                            scene_arr.astype(np.uint8), count)


def _items(values: object) -> Sequence[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidArgument(f"expected a sequence, not {type(values).__name__}")
    return values


def _u32_column(name: str, values: Any, n: int, top: int) -> npt.NDArray[np.int64]:
    # Checked before any narrowing cast, so 256 never wraps to scene 0.
    try:
        array = np.broadcast_to(np.asarray(values), (n,))
    except (TypeError, ValueError):     # ragged, or not one value per row
        raise InvalidArgument(f"{name}: one integer for all rows, or one per row") from None
    if array.dtype.kind not in "iu":
        raise InvalidArgument(f"{name} must be integers")
    if n and (array.min() < 0 or array.max() > top):
        raise InvalidArgument(f"{name} must be in [0, {top}]")
    return np.ascontiguousarray(array, dtype=np.int64)
