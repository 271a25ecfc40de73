# The compiled hot path: token signing and verification below the GIL, the
# issuer-signature cache, and libsodium reached through PyNaCl's own copy.
# _ref.py is the same API in pure Python; both pass the same tests.

import os
import threading

import nacl.bindings  # noqa: F401  (importing it runs sodium_init once)
import numpy as np
from nacl._sodium import ffi as _ffi, lib as _lib

from qrpay import _args
from qrpay.errors import InvalidArgument, InvalidKey
from qrpay import format as layout
from qrpay.format import TAG_CRED, TAG_TOKEN

from cpython.bytes cimport (
    PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.math cimport INFINITY, NAN, floor
from libc.string cimport memcmp, memcpy


cdef uintptr_t _address(str name) except 0:
    # The function pointer PyNaCl's cffi module holds: the libsodium it loaded.
    return <uintptr_t>int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, name)))


cdef sign_open_fn _sign_open = <sign_open_fn>_address("crypto_sign_open")
cdef sign_fn _sign = <sign_fn>_address("crypto_sign")
cdef valid_point_fn _valid_point = <valid_point_fn>_address("crypto_core_ed25519_is_valid_point")

cdef uint8_t _TAG_CRED[TAG_LEN]
cdef uint8_t _TAG_TOKEN[TAG_LEN]
cdef bytes _tag_cred = TAG_CRED
cdef bytes _tag_token = TAG_TOKEN
memcpy(_TAG_CRED, <const char *>_tag_cred, TAG_LEN)
memcpy(_TAG_TOKEN, <const char *>_tag_token, TAG_LEN)


cdef inline uint16_t load_u16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t load_u64(const uint8_t *p) noexcept nogil:
    return load_u32(p) | (<uint64_t>load_u32(p + 4) << 32)


cdef inline void store_u32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef bint verify_cred_signature(const uint8_t *issuer_pk, const uint8_t *cred) noexcept nogil:
    # libsodium only has combined mode here: sm = signature || tag || body.
    cdef uint8_t sm[SIG_LEN + TAG_LEN + CRED_BODY_LEN]
    memcpy(sm, cred + CRED_ISSUER_SIG, SIG_LEN)
    memcpy(sm + SIG_LEN, _TAG_CRED, TAG_LEN)
    memcpy(sm + SIG_LEN + TAG_LEN, cred, CRED_BODY_LEN)
    return _sign_open(NULL, NULL, sm, sizeof(sm), issuer_pk) == 0


cdef bint verify_device_signature(const uint8_t *tok) noexcept nogil:
    # The device key comes from the credential, whose issuer checked the point
    # (is_valid_point) before signing it; libsodium rejects small-order and
    # non-canonical keys again on every verify.
    cdef uint8_t sm[SIG_LEN + MAX_SIGNED]
    memcpy(sm, tok + TOKEN_DEVICE_SIG, SIG_LEN)
    memcpy(sm + SIG_LEN, _TAG_TOKEN, TAG_LEN)
    memcpy(sm + SIG_LEN + TAG_LEN, tok, TOKEN_BODY_LEN)
    return _sign_open(NULL, NULL, sm, sizeof(sm), tok + CRED_DEVICE_KEY) == 0


cdef int build_token(const uint8_t *cred, const uint8_t *sk, uint32_t issued_at,
                     uint32_t counter, uint8_t scene, uint8_t *out) noexcept nogil:
    cdef uint8_t m[MAX_SIGNED]
    cdef uint8_t sm[SIG_LEN + MAX_SIGNED]
    memcpy(out, cred, CRED_LEN)
    store_u32(out + TOKEN_ISSUED_AT, issued_at)
    store_u32(out + TOKEN_COUNTER, counter)
    out[TOKEN_SCENE] = scene
    memcpy(m, _TAG_TOKEN, TAG_LEN)
    memcpy(m + TAG_LEN, out, TOKEN_BODY_LEN)
    if _sign(sm, NULL, m, MAX_SIGNED, sk) != 0:
        return -1
    memcpy(out + TOKEN_DEVICE_SIG, sm, SIG_LEN)
    return 0


cdef int final_checks(const uint8_t *tok, int64_t now, int64_t max_age,
                      int64_t skew) noexcept nogil:
    # Runs only after both signatures held: these fields are now trusted.
    cdef int64_t issued_at = load_u32(tok + TOKEN_ISSUED_AT)
    cdef uint8_t scene = tok[TOKEN_SCENE]
    if now < <int64_t>load_u32(tok + CRED_NOT_BEFORE):
        return R_CREDENTIAL_NOT_YET_VALID
    if now > <int64_t>load_u32(tok + CRED_NOT_AFTER):
        return R_CREDENTIAL_EXPIRED
    if issued_at > now + skew:
        return R_TOKEN_FROM_FUTURE
    if issued_at < now - max_age - skew:
        return R_TOKEN_STALE
    if scene >= SCENE_COUNT or not ((load_u16(tok + CRED_SCENES) >> scene) & 1):
        return R_SCENE_NOT_ALLOWED
    return R_OK


cdef inline uint64_t slot_hash(const uint8_t *cred, uint64_t key) noexcept nogil:
    return ((load_u64(cred + CRED_ISSUER_SIG) ^ key) * <uint64_t>0x9E3779B97F4A7C15) >> 29


def _split(work, Py_ssize_t n, int threads):
    # Work items are interleaved (i = t, t + T, ...) so cold and warm tokens
    # spread evenly; the calling thread takes share 0. `n` counts shares (see
    # _args.units), so a thread never starts for a token or two.
    cdef int t, count = max(1, min(threads, n))
    workers = [threading.Thread(target=work, args=(t, count)) for t in range(1, count)]
    for w in workers:
        w.start()
    work(0, count)
    for w in workers:
        w.join()


cdef class _Batch:
    # Per-token working state of one verify_many call (fields in _core.pxd).
    pass


cdef class Verifier:
    def __cinit__(self, trust_rows, cache_size=65536):
        # The same checks, in the same order, as the twin: the same error.
        cdef Py_ssize_t size = _args.cache_size(cache_size)
        rows = _args.trust_rows(trust_rows)
        cdef Py_ssize_t i, n_sets = 1
        cdef bytes pk
        while n_sets * CACHE_WAYS < size:
            n_sets *= 2
        self.trust = <TrustEntry *>PyMem_Malloc(max(1, len(rows)) * sizeof(TrustEntry))
        self.cache = <CacheEntry *>PyMem_Calloc(n_sets * CACHE_WAYS, sizeof(CacheEntry))
        self.victim = <uint8_t *>PyMem_Calloc(n_sets, 1)
        if self.trust == NULL or self.cache == NULL or self.victim == NULL:
            raise MemoryError()
        self.set_mask = n_sets - 1
        self.hash_key = int.from_bytes(os.urandom(8), "little")
        for i, (kid, pk, not_before, not_after, roles) in enumerate(rows):
            self.trust[i].kid = kid
            memcpy(self.trust[i].pk, <const char *>pk, PK_LEN)
            self.trust[i].not_before = not_before
            self.trust[i].not_after = not_after
            self.trust[i].roles = roles
        self.n_trust = len(rows)

    def __dealloc__(self):
        PyMem_Free(self.trust)
        PyMem_Free(self.cache)
        PyMem_Free(self.victim)

    @property
    def cache_capacity(self):
        return (self.set_mask + 1) * CACHE_WAYS

    cdef int header_check(self, const uint8_t *tok, Py_ssize_t length,
                          int64_t now, Py_ssize_t *key_index) noexcept nogil:
        cdef Py_ssize_t i
        cdef uint32_t kid
        if length != TOKEN_LEN:
            return R_WRONG_LENGTH
        if tok[0] != VERSION:
            return R_UNSUPPORTED_VERSION
        kid = load_u32(tok + CRED_KID)
        for i in range(self.n_trust):
            if self.trust[i].kid == kid:
                key_index[0] = i
                if not (self.trust[i].roles & ROLE_CREDENTIALS):
                    return R_ISSUER_KEY_ROLE
                if now < self.trust[i].not_before or now > self.trust[i].not_after:
                    return R_ISSUER_KEY_NOT_VALID
                return R_OK
        return R_UNKNOWN_KID

    cdef Py_ssize_t cache_find(self, const uint8_t *cred) noexcept nogil:
        # The key is every byte of the credential, signature included: a forged
        # credential differs somewhere and cannot hit an honest entry.
        cdef Py_ssize_t base = (slot_hash(cred, self.hash_key) & self.set_mask) * CACHE_WAYS
        cdef Py_ssize_t w
        for w in range(CACHE_WAYS):
            if self.cache[base + w].used and memcmp(self.cache[base + w].cred, cred, CRED_LEN) == 0:
                return base + w
        return -1

    cdef void cache_put(self, const uint8_t *cred) noexcept nogil:
        cdef Py_ssize_t s = slot_hash(cred, self.hash_key) & self.set_mask
        cdef Py_ssize_t base = s * CACHE_WAYS
        cdef Py_ssize_t w, slot = -1
        if self.cache_find(cred) >= 0:
            return
        for w in range(CACHE_WAYS):
            if not self.cache[base + w].used:
                slot = base + w
                break
        if slot < 0:
            slot = base + self.victim[s]
            self.victim[s] = (self.victim[s] + 1) % CACHE_WAYS
        memcpy(self.cache[slot].cred, cred, CRED_LEN)
        self.cache[slot].used = 1

    def verify_one(self, token, now, max_age, skew):
        cdef int64_t t = _policy_arg(now, MAX_TIME, "now")
        cdef int64_t age = _policy_arg(max_age, MAX_WINDOW, "max_age")
        cdef int64_t sk = _policy_arg(skew, MAX_WINDOW, "skew")
        if not PyBytes_CheckExact(token):   # never read another object as if it were bytes
            raise InvalidArgument("a token is bytes")
        cdef const uint8_t *tok = <const uint8_t *>PyBytes_AS_STRING(token)
        cdef Py_ssize_t key_index = -1
        cdef int reason = self.header_check(tok, PyBytes_GET_SIZE(token), t, &key_index)
        cdef bint cached, cred_ok = True, dev_ok = False
        if reason != R_OK:
            return reason
        with nogil:
            with self.lock:
                cached = self.cache_find(tok) >= 0
                if cached:
                    self.hits += 1
                else:
                    self.misses += 1
            if not cached:
                cred_ok = verify_cred_signature(self.trust[key_index].pk, tok)
            if cred_ok:
                dev_ok = verify_device_signature(tok)
                if not cached:
                    with self.lock:
                        self.cache_put(tok)
        if not cred_ok:
            return R_BAD_ISSUER_SIGNATURE
        if not dev_ok:
            return R_BAD_DEVICE_SIGNATURE
        return final_checks(tok, t, age, sk)

    def verify_many(self, tokens, lengths, now, max_age, skew, threads=1):
        # `now` is one time for the batch or one per token (settlement re-verifies
        # each record at the gateway time it was scanned). Every array is
        # copied first (_args.batch): another thread may write the caller's
        # arrays, never these, so what is checked is what is verified and cached.
        own_tokens, own_lengths, times = _args.batch(tokens, lengths, now)
        cdef int64_t age = _policy_arg(max_age, MAX_WINDOW, "max_age")
        cdef int64_t sk = _policy_arg(skew, MAX_WINDOW, "skew")
        cdef int n_threads = _args.threads(threads)
        cdef Py_ssize_t n = own_tokens.shape[0]
        reasons = np.zeros(n, dtype=np.uint8)
        cdef _Batch b = _Batch()
        b.n = n
        b.tokens = own_tokens
        b.lengths = own_lengths
        b.now = times
        b.reasons = reasons
        b.key_index = np.full(n, -1, dtype=np.int64)
        b.leader = np.full(n, -1, dtype=np.int64)
        b.cred_ok = np.zeros(n, dtype=np.uint8)
        b.dev_ok = np.zeros(n, dtype=np.uint8)
        cdef int64_t[::1] pending = np.full(_pow2_at_least(2 * n), -1, dtype=np.int64)
        with nogil:
            with self.lock:
                self._plan(b, pending)
        _split(lambda t, count: self._verify_share(b, t, count), _args.units(n), n_threads)
        with nogil:
            with self.lock:
                self._conclude(b, age, sk)
        return reasons

    cdef void _plan(self, _Batch b, int64_t[::1] pending) noexcept nogil:
        # Header checks and cache lookups; an uncached credential seen twice in
        # one batch is verified once (its first token leads, the rest wait on it).
        cdef Py_ssize_t i, j, ki, mask = pending.shape[0] - 1
        cdef const uint8_t *tok
        cdef uint64_t h
        for i in range(b.n):
            tok = &b.tokens[i, 0]
            b.reasons[i] = self.header_check(tok, b.lengths[i], b.now[i], &ki)
            if b.reasons[i] != R_OK:
                continue
            b.key_index[i] = ki
            if self.cache_find(tok) >= 0:
                self.hits += 1
                continue
            h = slot_hash(tok, self.hash_key) & mask
            while True:
                j = pending[h]
                if j < 0:
                    pending[h] = i
                    b.leader[i] = i
                    self.misses += 1
                    break
                if memcmp(&b.tokens[j, 0], tok, CRED_LEN) == 0:
                    b.leader[i] = j
                    self.hits += 1
                    break
                h = (h + 1) & mask

    def _verify_share(self, _Batch b, Py_ssize_t start, Py_ssize_t step):
        cdef Py_ssize_t i = start
        cdef const uint8_t *tok
        with nogil:
            while i < b.n:
                if b.reasons[i] == R_OK:
                    tok = &b.tokens[i, 0]
                    if b.leader[i] == i:
                        b.cred_ok[i] = verify_cred_signature(self.trust[b.key_index[i]].pk, tok)
                    if b.leader[i] != i or b.cred_ok[i]:
                        b.dev_ok[i] = verify_device_signature(tok)
                i += step

    cdef void _conclude(self, _Batch b, int64_t max_age, int64_t skew) noexcept nogil:
        cdef Py_ssize_t i, lead
        for i in range(b.n):
            if b.reasons[i] != R_OK:
                continue
            lead = b.leader[i]
            if lead >= 0 and not b.cred_ok[lead]:
                b.reasons[i] = R_BAD_ISSUER_SIGNATURE
                continue
            if lead == i:
                self.cache_put(&b.tokens[i, 0])
            if not b.dev_ok[i]:
                b.reasons[i] = R_BAD_DEVICE_SIGNATURE
                continue
            b.reasons[i] = final_checks(&b.tokens[i, 0], b.now[i], max_age, skew)


# Largest max_age / skew and `now` (qrpay.format; C enums are too narrow).
cdef int64_t MAX_WINDOW = layout.MAX_WINDOW
cdef int64_t MAX_TIME = layout.MAX_TIME


cdef int64_t _policy_arg(object value, int64_t top, str name) except -1:
    # A plain int in [0, top], the bounds that keep now - max_age - skew and
    # now + skew inside int64; anything else (bool, float, None, a numpy
    # scalar, out of range) is InvalidArgument, as in the twin. A C function:
    # verify_one calls it for every token.
    cdef int overflow = 0
    cdef long long v
    if PyLong_CheckExact(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= v <= top:
            return v
    raise InvalidArgument(f"{name} must be an int in [0, {top}], not {value!r:.80}")


cdef Py_ssize_t _pow2_at_least(Py_ssize_t n) noexcept:
    cdef Py_ssize_t p = 1
    while p < n:
        p *= 2
    return p


def make_token(bytes credential not None, bytes secret_key not None, uint32_t issued_at,
               uint32_t counter, uint8_t scene):
    if PyBytes_GET_SIZE(credential) != CRED_LEN:
        raise InvalidArgument(f"a credential is {CRED_LEN} bytes")
    if PyBytes_GET_SIZE(secret_key) != SK_LEN:
        raise InvalidKey(f"a signing key is {SK_LEN} bytes")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, TOKEN_LEN)
    cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
    cdef const uint8_t *c = <const uint8_t *>PyBytes_AS_STRING(credential)
    cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(secret_key)
    cdef int rc
    with nogil:
        rc = build_token(c, k, issued_at, counter, scene, o)
    if rc != 0:
        raise InvalidKey("libsodium refused to sign")
    return out


cdef class _SignBatch:
    cdef const uint8_t[:, ::1] creds
    cdef const uint8_t[:, ::1] keys
    cdef const uint32_t[::1] issued_at
    cdef const uint32_t[::1] counters
    cdef const uint8_t[::1] scenes
    cdef uint8_t[:, ::1] out
    cdef Py_ssize_t n
    cdef int failed

    def share(self, Py_ssize_t start, Py_ssize_t step):
        cdef Py_ssize_t i = start
        with nogil:
            while i < self.n:
                if build_token(&self.creds[i, 0], &self.keys[i, 0], self.issued_at[i],
                               self.counters[i], self.scenes[i], &self.out[i, 0]) != 0:
                    self.failed = 1
                i += step


def make_tokens(const uint8_t[:, ::1] credentials, const uint8_t[:, ::1] secret_keys,
                const uint32_t[::1] issued_at, const uint32_t[::1] counters,
                const uint8_t[::1] scenes, threads=1):
    cdef int n_threads = _args.threads(threads)
    cdef Py_ssize_t n = credentials.shape[0]
    if credentials.shape[1] != CRED_LEN or secret_keys.shape[1] != SK_LEN:
        raise InvalidArgument(f"credentials must be (n, {CRED_LEN}) and keys (n, {SK_LEN})")
    if not (secret_keys.shape[0] == issued_at.shape[0] == counters.shape[0] == scenes.shape[0] == n):
        raise InvalidArgument("every input needs one row per token")
    out = np.empty((n, TOKEN_LEN), dtype=np.uint8)
    cdef _SignBatch b = _SignBatch()
    b.creds, b.keys, b.issued_at, b.counters, b.scenes = credentials, secret_keys, issued_at, counters, scenes
    b.out = out
    b.n = n
    _split(b.share, _args.units(n), n_threads)
    if b.failed:
        raise InvalidKey("libsodium refused to sign")
    return out


def sign_detached(bytes secret_key not None, bytes message not None):
    if PyBytes_GET_SIZE(secret_key) != SK_LEN:
        raise InvalidKey(f"a signing key is {SK_LEN} bytes")
    cdef Py_ssize_t mlen = PyBytes_GET_SIZE(message)
    cdef uint8_t *sm = <uint8_t *>PyMem_Malloc(SIG_LEN + mlen)
    cdef const uint8_t *m = <const uint8_t *>PyBytes_AS_STRING(message)
    cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(secret_key)
    cdef int rc
    if sm == NULL:
        raise MemoryError()
    try:
        with nogil:
            rc = _sign(sm, NULL, m, mlen, k)
        if rc != 0:
            raise InvalidKey("libsodium refused to sign")
        return PyBytes_FromStringAndSize(<char *>sm, SIG_LEN)
    finally:
        PyMem_Free(sm)


def verify_detached(bytes public_key not None, bytes message not None,
                    bytes signature not None):
    if PyBytes_GET_SIZE(public_key) != PK_LEN:
        raise InvalidKey(f"a public key is {PK_LEN} bytes")
    if PyBytes_GET_SIZE(signature) != SIG_LEN:
        return False
    cdef Py_ssize_t mlen = PyBytes_GET_SIZE(message)
    cdef uint8_t *sm = <uint8_t *>PyMem_Malloc(SIG_LEN + mlen)
    cdef const uint8_t *pk = <const uint8_t *>PyBytes_AS_STRING(public_key)
    cdef int rc
    if sm == NULL:
        raise MemoryError()
    memcpy(sm, PyBytes_AS_STRING(signature), SIG_LEN)
    memcpy(sm + SIG_LEN, PyBytes_AS_STRING(message), mlen)
    with nogil:
        rc = _sign_open(NULL, NULL, sm, SIG_LEN + mlen, pk)
    PyMem_Free(sm)
    return rc == 0


def is_valid_point(bytes point not None):
    if PyBytes_GET_SIZE(point) != PK_LEN:
        return False
    return _valid_point(<const uint8_t *>PyBytes_AS_STRING(point)) == 1


# Layout constants as the C code sees them, for the contract test.
LAYOUT = {
    "VERSION": VERSION, "CRED_KID": CRED_KID, "CRED_ACCOUNT": CRED_ACCOUNT,
    "CRED_SERIAL": CRED_SERIAL, "CRED_DEVICE_KEY": CRED_DEVICE_KEY,
    "CRED_NOT_BEFORE": CRED_NOT_BEFORE, "CRED_NOT_AFTER": CRED_NOT_AFTER,
    "CRED_LIMIT": CRED_LIMIT, "CRED_SCENES": CRED_SCENES, "CRED_BODY_LEN": CRED_BODY_LEN,
    "CRED_ISSUER_SIG": CRED_ISSUER_SIG, "CRED_LEN": CRED_LEN,
    "TOKEN_ISSUED_AT": TOKEN_ISSUED_AT, "TOKEN_COUNTER": TOKEN_COUNTER,
    "TOKEN_SCENE": TOKEN_SCENE, "TOKEN_BODY_LEN": TOKEN_BODY_LEN,
    "TOKEN_DEVICE_SIG": TOKEN_DEVICE_SIG, "TOKEN_LEN": TOKEN_LEN, "SCENE_COUNT": SCENE_COUNT,
}


cdef inline bint _bsearch(const uint64_t[::1] hay, uint64_t value) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = hay.shape[0], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if hay[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo < hay.shape[0] and hay[lo] == value


def sorted_contains(const uint64_t[::1] haystack, const uint64_t[::1] needles):
    # Deny-list lookups: haystack is sorted ascending (DenyList guarantees it).
    cdef Py_ssize_t i, n = needles.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    cdef uint8_t[::1] o = out.view(np.uint8)
    with nogil:
        for i in range(n):
            o[i] = _bsearch(haystack, needles[i])
    return out


# -- scorecard kernel ----------------------------------------------------------------
# A card arrives as flat arrays: per feature f, its bin edges in
# edges[edge_off[f]:edge_off[f+1]] (numeric bin b holds edges[b-1] <= v < edges[b]),
# its points in points[point_off[f]:point_off[f+1]] laid out as numeric bins, then
# the missing bin, then one bin per special code (specials[special_off[f]:...]).

ctypedef fused real:
    float
    double


cdef extern from "_score_kernel.h" nogil:
    enum:
        QRPAY_FAST_EDGES
        QRPAY_FAST_SPECIALS
    ctypedef struct qrpay_fast_feature:
        double edges[8]
        double step[8]
        double first
        double specials[2]
        double special_points[2]
        double missing
        double best
        double code_limit
        double unseen
        int n_edges
    void qrpay_score_fast(const char *X, Py_ssize_t row_stride, Py_ssize_t col_stride,
                          int is_float32, const qrpay_fast_feature *features,
                          Py_ssize_t n_features, int64_t base, int64_t *scores,
                          int k, int16_t *reasons, Py_ssize_t start, Py_ssize_t end,
                          Py_ssize_t n_rows)
    enum:
        QRPAY_CHUNK_ROWS
    Py_ssize_t qrpay_claim_rows(Py_ssize_t *next)


cdef struct FeatureView:
    const double *edges
    const double *specials
    const int32_t *points
    Py_ssize_t n_edges
    Py_ssize_t n_specials
    int32_t best
    double code_limit    # categorical: K, the unseen code (see _score_kernel.h); numeric: -1


cdef struct Card:
    const FeatureView *features
    Py_ssize_t n_features
    int64_t base
    int k


cdef inline int32_t points_of(const FeatureView *f, double v) noexcept nogil:
    cdef Py_ssize_t j, b = 0
    if v != v:
        return f.points[f.n_edges + 1]                  # the missing bin
    if f.code_limit >= 0 and not (0 <= v <= f.code_limit and v == floor(v)):
        return f.points[f.n_edges]                      # no category's code: unseen
    for j in range(f.n_specials):
        if v == f.specials[j]:
            return f.points[f.n_edges + 2 + j]          # this special code's bin
    for j in range(f.n_edges):
        b += v >= f.edges[j]                            # few edges: a branch-free count
    return f.points[b]


cdef void score_range(const real[:, :] X, const Card *card, int64_t *scores,
                      int16_t *reasons, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    cdef Py_ssize_t i, f, r, slot, k = card.k
    cdef int64_t total
    cdef int32_t pts, loss
    cdef int32_t top_loss[8]
    cdef int16_t top_feature[8]
    cdef const FeatureView *feature
    for i in range(start, end):
        total = card.base
        for r in range(k):
            top_loss[r] = 0
            top_feature[r] = -1
        for f in range(card.n_features):
            feature = &card.features[f]
            pts = points_of(feature, <double>X[i, f])
            total += pts
            loss = feature.best - pts
            if k and loss > top_loss[k - 1]:
                # Keep the k largest losses, earlier feature first on ties.
                slot = k - 1
                while slot > 0 and loss > top_loss[slot - 1]:
                    top_loss[slot] = top_loss[slot - 1]
                    top_feature[slot] = top_feature[slot - 1]
                    slot -= 1
                top_loss[slot] = loss
                top_feature[slot] = <int16_t>f
        scores[i] = total
        for r in range(k):
            reasons[i * k + r] = top_feature[r]


cdef class _ScoreJob:
    cdef Card card
    cdef FeatureView *views
    cdef qrpay_fast_feature *fast   # set when the fast path applies (see _score_kernel.h)
    cdef object keep            # the arrays the views point into
    cdef int64_t[::1] scores
    cdef int16_t[:, ::1] reasons
    cdef object X
    cdef Py_ssize_t n
    cdef Py_ssize_t next_row     # the first row no thread has claimed yet

    def __dealloc__(self):
        PyMem_Free(self.views)
        PyMem_Free(self.fast)

    def share(self, Py_ssize_t t, Py_ssize_t count):
        # Every thread claims chunks of rows from one counter until none are
        # left (t and count are _split's; the counter makes them moot).
        cdef Py_ssize_t start, end, row_stride, col_stride
        cdef int16_t *reasons = &self.reasons[0, 0] if self.card.k else NULL
        cdef const double[:, :] x64
        cdef const float[:, :] x32
        cdef const char *data
        cdef bint is64 = self.X.dtype == np.float64
        if is64:
            x64 = self.X
            data, row_stride, col_stride = <const char *>&x64[0, 0], x64.strides[0], x64.strides[1]
        else:
            x32 = self.X
            data, row_stride, col_stride = <const char *>&x32[0, 0], x32.strides[0], x32.strides[1]
        with nogil:
            while True:
                start = qrpay_claim_rows(&self.next_row)
                if start >= self.n:
                    break
                end = min(start + QRPAY_CHUNK_ROWS, self.n)
                if self.fast != NULL:
                    qrpay_score_fast(data, row_stride, col_stride, not is64, self.fast,
                                     self.card.n_features, self.card.base, &self.scores[0],
                                     self.card.k, reasons, start, end, self.n)
                elif is64:
                    score_range(x64, &self.card, &self.scores[0], reasons, start, end)
                else:
                    score_range(x32, &self.card, &self.scores[0], reasons, start, end)


cdef bint _fits_fast_path(const FeatureView *views, Py_ssize_t n_features) noexcept:
    cdef Py_ssize_t f
    for f in range(n_features):
        if views[f].n_edges > QRPAY_FAST_EDGES or views[f].n_specials > QRPAY_FAST_SPECIALS:
            return False
    return True


cdef qrpay_fast_feature *_fast_features(const FeatureView *views, Py_ssize_t n_features) except NULL:
    # Edges padded with +inf and a zero step; specials padded with NaN.
    cdef qrpay_fast_feature *fast = <qrpay_fast_feature *>PyMem_Calloc(
        n_features, sizeof(qrpay_fast_feature))
    cdef Py_ssize_t f, j
    if fast == NULL:
        raise MemoryError()
    for f in range(n_features):
        for j in range(QRPAY_FAST_EDGES):
            if j < views[f].n_edges:
                fast[f].edges[j] = views[f].edges[j]
                fast[f].step[j] = views[f].points[j + 1] - views[f].points[j]
            else:
                fast[f].edges[j] = INFINITY
                fast[f].step[j] = 0.0
        fast[f].first = views[f].points[0]
        for j in range(QRPAY_FAST_SPECIALS):
            if j < views[f].n_specials:
                fast[f].specials[j] = views[f].specials[j]
                fast[f].special_points[j] = views[f].points[views[f].n_edges + 2 + j]
            else:
                fast[f].specials[j] = NAN
                fast[f].special_points[j] = 0.0
        fast[f].missing = views[f].points[views[f].n_edges + 1]
        fast[f].best = views[f].best
        fast[f].code_limit = views[f].code_limit
        fast[f].unseen = views[f].points[views[f].n_edges]
        fast[f].n_edges = <int>views[f].n_edges
    return fast


def score_rows(X, const double[::1] edges, const int64_t[::1] edge_off,
               const int32_t[::1] points, const int64_t[::1] point_off,
               const double[::1] specials, const int64_t[::1] special_off,
               const int32_t[::1] best, const double[::1] code_limit, int64_t base, int k,
               threads=1):
    cdef int n_threads = _args.threads(threads)
    cdef Py_ssize_t f, n = X.shape[0], n_features = edge_off.shape[0] - 1
    if X.ndim != 2 or X.shape[1] != n_features or X.dtype not in (np.float32, np.float64):
        raise InvalidArgument(f"X must be a 2-D float32/float64 array with {n_features} columns")
    if not 0 <= k <= min(8, n_features) or best.shape[0] != n_features:
        raise InvalidArgument("k must be between 0 and the number of features (at most 8)")
    if (special_off.shape[0] != n_features + 1 or point_off.shape[0] != n_features + 1
            or code_limit.shape[0] != n_features):
        raise InvalidArgument("one offset per feature, plus one; one code limit per feature")
    cdef _ScoreJob job = _ScoreJob()
    job.views = <FeatureView *>PyMem_Malloc(max(1, n_features) * sizeof(FeatureView))
    if job.views == NULL:
        raise MemoryError()
    for f in range(n_features):
        job.views[f].n_edges = edge_off[f + 1] - edge_off[f]
        job.views[f].n_specials = special_off[f + 1] - special_off[f]
        if point_off[f + 1] - point_off[f] != job.views[f].n_edges + 2 + job.views[f].n_specials:
            raise InvalidArgument("each feature needs points for its bins, missing and specials")
        job.views[f].edges = &edges[edge_off[f]] if job.views[f].n_edges else NULL
        job.views[f].specials = &specials[special_off[f]] if job.views[f].n_specials else NULL
        job.views[f].points = &points[point_off[f]]
        job.views[f].best = best[f]
        job.views[f].code_limit = code_limit[f]
    if n_features and _fits_fast_path(job.views, n_features):
        job.fast = _fast_features(job.views, n_features)
    scores = np.empty(n, dtype=np.int64)
    reasons = np.empty((n, k), dtype=np.int16)    # both kernels write every slot
    job.keep = (edges, points, specials)
    job.X = X
    job.n = n
    job.next_row = 0
    job.scores = scores if n else np.zeros(1, dtype=np.int64)
    job.reasons = reasons if n and k else np.full((1, 1), -1, dtype=np.int16)
    job.card.features = job.views
    job.card.n_features = n_features
    job.card.base = base
    job.card.k = k
    if n:
        # One thread per chunk at most: a small input is not worth a thread start.
        _split(job.share, (n + QRPAY_CHUNK_ROWS - 1) // QRPAY_CHUNK_ROWS, n_threads)
    return scores, reasons
