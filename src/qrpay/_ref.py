"""The core's API in pure Python: the reference the compiled core is tested
against, and the fallback where the extension is not built
(QRPAY_NO_EXTENSIONS=1). Same names, same results, same exceptions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from nacl import bindings as sodium
from nacl.exceptions import BadSignatureError

from qrpay import _args
from qrpay._args import CACHE_WAYS
from qrpay.errors import InvalidArgument, InvalidKey, Reason
from qrpay.format import (
    CRED_BODY_LEN, CRED_DEVICE_KEY, CRED_ISSUER_SIG, CRED_KID, CRED_LEN, CRED_NOT_AFTER,
    CRED_NOT_BEFORE, CRED_SCENES, MAX_TIME, MAX_WINDOW, PUBLIC_KEY_LEN, SCENE_COUNT, SECRET_KEY_LEN,
    SIGNATURE_LEN, TAG_CRED, TAG_TOKEN, TOKEN_BODY_LEN, TOKEN_DEVICE_SIG,
    TOKEN_FIELDS_STRUCT, TOKEN_ISSUED_AT, TOKEN_LEN, TOKEN_SCENE, VERSION,
)

ROLE_CREDENTIALS = 1

TrustRow = tuple[int, bytes, int, int, int]


def _u32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 4], "little")


def _open(signed: bytes, public_key: bytes) -> bool:
    try:
        sodium.crypto_sign_open(signed, public_key)
    except BadSignatureError:
        return False
    return True


def _verify_cred_signature(issuer_pk: bytes, tok: bytes) -> bool:
    return _open(tok[CRED_ISSUER_SIG:CRED_LEN] + TAG_CRED + tok[:CRED_BODY_LEN], issuer_pk)


def _verify_device_signature(tok: bytes) -> bool:
    signed = tok[TOKEN_DEVICE_SIG:TOKEN_LEN] + TAG_TOKEN + tok[:TOKEN_BODY_LEN]
    return _open(signed, tok[CRED_DEVICE_KEY:CRED_DEVICE_KEY + PUBLIC_KEY_LEN])


def _final_checks(tok: bytes, now: int, max_age: int, skew: int) -> int:
    issued_at = _u32(tok, TOKEN_ISSUED_AT)
    scene = tok[TOKEN_SCENE]
    if now < _u32(tok, CRED_NOT_BEFORE):
        return Reason.CREDENTIAL_NOT_YET_VALID
    if now > _u32(tok, CRED_NOT_AFTER):
        return Reason.CREDENTIAL_EXPIRED
    if issued_at > now + skew:
        return Reason.TOKEN_FROM_FUTURE
    if issued_at < now - max_age - skew:
        return Reason.TOKEN_STALE
    scenes = int.from_bytes(tok[CRED_SCENES:CRED_SCENES + 2], "little")
    if scene >= SCENE_COUNT or not (scenes >> scene) & 1:
        return Reason.SCENE_NOT_ALLOWED
    return Reason.OK


def _policy_arg(value: object, top: int, name: str) -> int:
    # As the core's: a plain int (not a bool, float or numpy scalar) in [0, top].
    if type(value) is not int or not 0 <= value <= top:
        raise InvalidArgument(f"{name} must be an int in [0, {top}], not {value!r:.80}")
    return value


def _exact_bytes(**values: object) -> None:
    # The core's `bytes x not None` arguments: exactly bytes, else TypeError.
    for name, value in values.items():
        if type(value) is not bytes:
            raise TypeError(f"Argument '{name}' has incorrect type (expected bytes, got "
                            f"{type(value).__name__})")


def _split(work: Callable[[int, int], None], n: int, threads: int) -> None:
    count = max(1, min(threads, n))
    workers = [threading.Thread(target=work, args=(t, count)) for t in range(1, count)]
    for w in workers:
        w.start()
    work(0, count)
    for w in workers:
        w.join()


class Verifier:
    """Trusted issuer keys plus a bounded cache of credentials whose issuer
    signature already verified. The cache key is the whole credential."""

    def __init__(self, trust_rows: Iterable[TrustRow], cache_size: int = 65536) -> None:
        size = _args.cache_size(cache_size)
        self._keys: list[TrustRow] = _args.trust_rows(trust_rows)
        capacity = CACHE_WAYS
        while capacity < size:
            capacity *= 2
        self._capacity = capacity
        self._cache: dict[bytes, None] = {}  # insertion ordered: oldest evicted first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cache_capacity(self) -> int:
        return self._capacity

    def _header_check(self, tok: bytes, now: int) -> tuple[int, int]:
        if len(tok) != TOKEN_LEN:
            return Reason.WRONG_LENGTH, -1
        if tok[0] != VERSION:
            return Reason.UNSUPPORTED_VERSION, -1
        kid = _u32(tok, CRED_KID)
        for i, (key_id, _pk, not_before, not_after, roles) in enumerate(self._keys):
            if key_id == kid:
                if not roles & ROLE_CREDENTIALS:
                    return Reason.ISSUER_KEY_ROLE, i
                if now < not_before or now > not_after:
                    return Reason.ISSUER_KEY_NOT_VALID, i
                return Reason.OK, i
        return Reason.UNKNOWN_KID, -1

    def _cache_put(self, cred: bytes) -> None:
        if cred in self._cache:
            return
        if len(self._cache) >= self._capacity:
            del self._cache[next(iter(self._cache))]
        self._cache[cred] = None

    def verify_one(self, token: bytes, now: int, max_age: int, skew: int) -> int:
        now = _policy_arg(now, MAX_TIME, "now")
        max_age = _policy_arg(max_age, MAX_WINDOW, "max_age")
        skew = _policy_arg(skew, MAX_WINDOW, "skew")
        if type(token) is not bytes:
            raise InvalidArgument("a token is bytes")
        reason, key_index = self._header_check(token, now)
        if reason != Reason.OK:
            return int(reason)
        cred = token[:CRED_LEN]
        with self._lock:
            cached = cred in self._cache
            if cached:
                self.hits += 1
            else:
                self.misses += 1
        if not cached and not _verify_cred_signature(self._keys[key_index][1], token):
            return int(Reason.BAD_ISSUER_SIGNATURE)
        dev_ok = _verify_device_signature(token)
        if not cached:
            with self._lock:
                self._cache_put(cred)
        if not dev_ok:
            return int(Reason.BAD_DEVICE_SIGNATURE)
        return int(_final_checks(token, now, max_age, skew))

    def verify_many(self, tokens: Any, lengths: Any, now: Any, max_age: int, skew: int,
                    threads: int = 1) -> np.ndarray[Any, np.dtype[np.uint8]]:
        # The core's checks in the core's order, on private copies (_args.batch).
        tokens, lengths, times = _args.batch(tokens, lengths, now)
        max_age = _policy_arg(max_age, MAX_WINDOW, "max_age")
        skew = _policy_arg(skew, MAX_WINDOW, "skew")
        count = _args.threads(threads)
        n = tokens.shape[0]
        nows = times.tolist()
        rows = [tokens[i].tobytes() for i in range(n)]
        reasons = np.zeros(n, dtype=np.uint8)
        key_index = [-1] * n
        leader = [-1] * n
        cred_ok = [False] * n
        dev_ok = [False] * n
        with self._lock:
            first_seen: dict[bytes, int] = {}
            for i, tok in enumerate(rows):
                if lengths[i] != TOKEN_LEN:
                    reasons[i] = Reason.WRONG_LENGTH
                    continue
                reasons[i], key_index[i] = self._header_check(tok, nows[i])
                if reasons[i] != Reason.OK:
                    continue
                cred = tok[:CRED_LEN]
                if cred in self._cache:
                    self.hits += 1
                elif cred in first_seen:
                    leader[i] = first_seen[cred]
                    self.hits += 1
                else:
                    first_seen[cred] = leader[i] = i
                    self.misses += 1

        def share(start: int, step: int) -> None:
            for i in range(start, n, step):
                if reasons[i] != Reason.OK:
                    continue
                if leader[i] == i:
                    cred_ok[i] = _verify_cred_signature(self._keys[key_index[i]][1], rows[i])
                if leader[i] != i or cred_ok[i]:
                    dev_ok[i] = _verify_device_signature(rows[i])

        _split(share, _args.units(n), count)
        with self._lock:
            for i, tok in enumerate(rows):
                if reasons[i] != Reason.OK:
                    continue
                lead = leader[i]
                if lead >= 0 and not cred_ok[lead]:
                    reasons[i] = Reason.BAD_ISSUER_SIGNATURE
                    continue
                if lead == i:
                    self._cache_put(tok[:CRED_LEN])
                if not dev_ok[i]:
                    reasons[i] = Reason.BAD_DEVICE_SIGNATURE
                    continue
                reasons[i] = _final_checks(tok, nows[i], max_age, skew)
        return reasons


def _build_token(credential: bytes, secret_key: bytes, issued_at: int, counter: int,
                 scene: int) -> bytes:
    body = credential + TOKEN_FIELDS_STRUCT.pack(issued_at, counter, scene)
    return body + sodium.crypto_sign(TAG_TOKEN + body, secret_key)[:SIGNATURE_LEN]


def _check_u32(value: int) -> None:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise OverflowError("value out of range for uint32_t")


def make_token(credential: bytes, secret_key: bytes, issued_at: int, counter: int,
               scene: int) -> bytes:
    _exact_bytes(credential=credential, secret_key=secret_key)
    _check_u32(issued_at)
    _check_u32(counter)
    if not 0 <= scene <= 255:
        raise OverflowError("value out of range for uint8_t")
    if len(credential) != CRED_LEN:
        raise InvalidArgument(f"a credential is {CRED_LEN} bytes")
    if len(secret_key) != SECRET_KEY_LEN:
        raise InvalidKey(f"a signing key is {SECRET_KEY_LEN} bytes")
    return _build_token(credential, secret_key, issued_at, counter, scene)


def make_tokens(credentials: Any, secret_keys: Any, issued_at: Any, counters: Any,
                scenes: Any, threads: int = 1) -> np.ndarray[Any, np.dtype[np.uint8]]:
    count = _args.threads(threads)
    n = credentials.shape[0]
    if credentials.shape[1] != CRED_LEN or secret_keys.shape[1] != SECRET_KEY_LEN:
        raise InvalidArgument(f"credentials must be (n, {CRED_LEN}) and keys (n, {SECRET_KEY_LEN})")
    if not (secret_keys.shape[0] == issued_at.shape[0] == counters.shape[0] == scenes.shape[0] == n):
        raise InvalidArgument("every input needs one row per token")
    out = np.empty((n, TOKEN_LEN), dtype=np.uint8)

    def share(start: int, step: int) -> None:
        for i in range(start, n, step):
            tok = _build_token(credentials[i].tobytes(), secret_keys[i].tobytes(),
                               int(issued_at[i]), int(counters[i]), int(scenes[i]))
            out[i] = np.frombuffer(tok, dtype=np.uint8)

    _split(share, _args.units(n), count)
    return out


def sign_detached(secret_key: bytes, message: bytes) -> bytes:
    _exact_bytes(secret_key=secret_key, message=message)
    if len(secret_key) != SECRET_KEY_LEN:
        raise InvalidKey(f"a signing key is {SECRET_KEY_LEN} bytes")
    return bytes(sodium.crypto_sign(message, secret_key)[:SIGNATURE_LEN])


def verify_detached(public_key: bytes, message: bytes, signature: bytes) -> bool:
    _exact_bytes(public_key=public_key, message=message, signature=signature)
    if len(public_key) != PUBLIC_KEY_LEN:
        raise InvalidKey(f"a public key is {PUBLIC_KEY_LEN} bytes")
    if len(signature) != SIGNATURE_LEN:
        return False
    return _open(signature + message, public_key)


def is_valid_point(point: bytes) -> bool:
    _exact_bytes(point=point)
    if len(point) != PUBLIC_KEY_LEN:
        return False
    return bool(sodium.crypto_core_ed25519_is_valid_point(point))



def sorted_contains(haystack: Any, needles: Any) -> np.ndarray[Any, np.dtype[np.bool_]]:
    hay = np.asarray(haystack, dtype=np.uint64)
    values = np.asarray(needles, dtype=np.uint64)
    at = np.minimum(np.searchsorted(hay, values), max(len(hay) - 1, 0))
    return np.asarray(hay[at] == values, dtype=np.bool_) if len(hay) else np.zeros(
        len(values), dtype=np.bool_)


def score_rows(X: Any, edges: Any, edge_off: Any, points: Any, point_off: Any, specials: Any,
               special_off: Any, best: Any, code_limit: Any, base: int, k: int,
               threads: int = 1
               ) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int16]]]:
    _args.threads(threads)   # checked as the core does; the twin scores in one thread
    n_features = len(edge_off) - 1
    if (not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != n_features
            or X.dtype not in (np.float32, np.float64)):
        raise InvalidArgument(f"X must be a 2-D float32/float64 array with {n_features} columns")
    if not 0 <= k <= min(8, n_features) or len(best) != n_features:
        raise InvalidArgument("k must be between 0 and the number of features (at most 8)")
    if len(code_limit) != n_features:
        raise InvalidArgument("one offset per feature, plus one; one code limit per feature")
    n = X.shape[0]
    gained = np.zeros((n, n_features), dtype=np.int64)
    for f in range(n_features):
        v = X[:, f].astype(np.float64)
        e = edges[edge_off[f]:edge_off[f + 1]]
        codes = specials[special_off[f]:special_off[f + 1]]
        pts = points[point_off[f]:point_off[f + 1]].astype(np.int64)
        bins = np.searchsorted(e, v, side="right")
        if code_limit[f] >= 0:   # categorical codes: anything but 0..K takes the unseen bin
            with np.errstate(invalid="ignore"):
                bins[~((v >= 0) & (v <= code_limit[f]) & (v == np.floor(v)))] = len(e)
        for j, code in enumerate(codes[::-1]):  # the first matching code wins
            bins[v == code] = len(e) + 2 + (len(codes) - 1 - j)
        bins[np.isnan(v)] = len(e) + 1
        gained[:, f] = pts[bins]
    scores = base + gained.sum(axis=1)
    reasons = np.full((n, k), -1, dtype=np.int16)
    if k:
        loss = np.asarray(best, dtype=np.int64)[None, :] - gained
        order = np.argsort(-loss, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(loss, order, axis=1)
        reasons[:] = np.where(top > 0, order, -1)
    return scores.astype(np.int64), reasons
