# The contract of the compiled core: layout constants, libsodium entry points,
# and the Verifier's fields. Bodies live in _core.pyx; format.py holds the same
# layout for Python and tests/test_core_contract.py checks that they agree.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

ctypedef int (*sign_open_fn)(unsigned char *m, unsigned long long *mlen_p,
                             const unsigned char *sm, unsigned long long smlen,
                             const unsigned char *pk) noexcept nogil
ctypedef int (*sign_fn)(unsigned char *sm, unsigned long long *smlen_p,
                        const unsigned char *m, unsigned long long mlen,
                        const unsigned char *sk) noexcept nogil
ctypedef int (*valid_point_fn)(const unsigned char *p) noexcept nogil

cdef enum:
    VERSION = 1
    PK_LEN = 32
    SK_LEN = 64
    SIG_LEN = 64
    TAG_LEN = 16
    CRED_KID = 1
    CRED_ACCOUNT = 5
    CRED_SERIAL = 13
    CRED_DEVICE_KEY = 21
    CRED_NOT_BEFORE = 53
    CRED_NOT_AFTER = 57
    CRED_LIMIT = 61
    CRED_SCENES = 65
    CRED_BODY_LEN = 67
    CRED_ISSUER_SIG = 67
    CRED_LEN = 131
    TOKEN_ISSUED_AT = 131
    TOKEN_COUNTER = 135
    TOKEN_SCENE = 139
    TOKEN_BODY_LEN = 140
    TOKEN_DEVICE_SIG = 140
    TOKEN_LEN = 204
    # Largest message signed here: tag || token body.
    MAX_SIGNED = TAG_LEN + TOKEN_BODY_LEN
    CACHE_WAYS = 4
    SCENE_COUNT = 7   # Scene values 0..6; a credential's other bits never admit a token

# Reason codes: the values of errors.Reason.
cdef enum:
    R_OK = 0
    R_WRONG_LENGTH = 1
    R_UNSUPPORTED_VERSION = 2
    R_UNKNOWN_KID = 3
    R_ISSUER_KEY_ROLE = 4
    R_ISSUER_KEY_NOT_VALID = 5
    R_BAD_ISSUER_SIGNATURE = 6
    R_BAD_DEVICE_SIGNATURE = 7
    R_CREDENTIAL_NOT_YET_VALID = 8
    R_CREDENTIAL_EXPIRED = 9
    R_TOKEN_FROM_FUTURE = 10
    R_TOKEN_STALE = 11
    R_SCENE_NOT_ALLOWED = 12

# Trust roles: the values of trust.Role.
cdef enum:
    ROLE_CREDENTIALS = 1

cdef struct TrustEntry:
    uint32_t kid
    uint8_t pk[PK_LEN]
    int64_t not_before
    int64_t not_after
    uint32_t roles

cdef struct CacheEntry:
    uint8_t used
    uint8_t cred[CRED_LEN]

cdef class _Batch:
    cdef const uint8_t[:, ::1] tokens
    cdef const int64_t[::1] lengths
    cdef const int64_t[::1] now
    cdef uint8_t[::1] reasons
    cdef int64_t[::1] key_index
    cdef int64_t[::1] leader      # -1: credential cached; i: verifies it; j: waits on j
    cdef uint8_t[::1] cred_ok
    cdef uint8_t[::1] dev_ok
    cdef Py_ssize_t n

cdef class Verifier:
    cdef TrustEntry *trust
    cdef Py_ssize_t n_trust
    cdef CacheEntry *cache
    cdef uint8_t *victim          # per set: the way to replace next
    cdef Py_ssize_t set_mask
    cdef uint64_t hash_key        # random per instance: slots are not predictable
    cdef cython.pymutex lock      # guards the cache
    cdef readonly unsigned long long hits
    cdef readonly unsigned long long misses

    cdef int header_check(self, const uint8_t *tok, Py_ssize_t length,
                          int64_t now, Py_ssize_t *key_index) noexcept nogil
    cdef Py_ssize_t cache_find(self, const uint8_t *cred) noexcept nogil
    cdef void cache_put(self, const uint8_t *cred) noexcept nogil
    cdef void _plan(self, _Batch b, int64_t[::1] pending) noexcept nogil
    cdef void _conclude(self, _Batch b, int64_t max_age, int64_t skew) noexcept nogil
