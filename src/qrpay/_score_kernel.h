/* The scorecard fast path: rows in blocks, one feature at a time, and a bin's
 * points as p0 plus the point step of every edge the value reaches, so every
 * inner loop is branch-free and vectorises (no table lookup). Used by _core.pyx
 * for `score` and `explain` when every feature has at most 8 edges and 2
 * special codes; larger cards use the row kernel. Points are integers well
 * below 2**53, so summing them in double is exact. */
#ifndef QRPAY_SCORE_KERNEL_H
#define QRPAY_SCORE_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define QRPAY_FAST_EDGES 8
#define QRPAY_FAST_SPECIALS 2
#define QRPAY_MAX_REASONS 8
#define QRPAY_BLOCK 512

typedef struct {
    double edges[QRPAY_FAST_EDGES];   /* ascending, padded with +inf */
    double step[QRPAY_FAST_EDGES];    /* points[j + 1] - points[j]; 0 for padding */
    double first;                     /* points of the first numeric bin */
    double specials[QRPAY_FAST_SPECIALS];  /* padded with NaN, which equals nothing */
    double special_points[QRPAY_FAST_SPECIALS];
    double missing;                   /* points of the NaN bin */
    double best;                      /* the feature's best points: loss = best - points */
    double code_limit;                /* categorical: K, the unseen code; numeric: -1 */
    double unseen;                    /* categorical: points of a value that is no code */
    int n_edges;                      /* real edges; the kernel is specialised on it */
} qrpay_fast_feature;

/* Built three times on x86-64 glibc Linux with GCC >= 11 (AVX-512, AVX2,
 * baseline); the loader picks one by CPU (an ifunc, which musl lacks).
 * Results are identical: only adds of integers. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) \
    && defined(__linux__) && defined(__GLIBC__)
#define QRPAY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QRPAY_CLONES
#endif

#if defined(__GNUC__)
#define QRPAY_INLINE static inline __attribute__((always_inline))
#else
#define QRPAY_INLINE static inline
#endif

/* total[i] += points of one feature for rows [0, n) of a block. `col` points at
 * the feature's first value, `stride` bytes apart; reading it in place (no copy
 * into a buffer) lets the compiler gather straight into vector registers.
 * Inlined with constant `ne`, `is_float32` and `is_codes`, the unused edges and
 * checks disappear. A categorical feature's values are codes: anything but an
 * integer in [0, K] (or NaN, missing) takes the unseen bin. Adding 2**52 rounds
 * a value in [0, 2**52) to an integer, so it comes back unchanged only when it
 * was one (round-to-nearest; the build keeps IEEE arithmetic). */
QRPAY_INLINE void qrpay_feature_pass(const char *col, ptrdiff_t stride, int is_float32,
                                     const qrpay_fast_feature *F, double *points,
                                     double *total, ptrdiff_t n, const int ne,
                                     const int is_codes)
{
    /* Locals, not F->...: stores to total[] could otherwise alias them. */
    const double e0 = F->edges[0], e1 = F->edges[1], e2 = F->edges[2], e3 = F->edges[3],
                 e4 = F->edges[4], e5 = F->edges[5], e6 = F->edges[6], e7 = F->edges[7];
    const double s0 = F->step[0], s1 = F->step[1], s2 = F->step[2], s3 = F->step[3],
                 s4 = F->step[4], s5 = F->step[5], s6 = F->step[6], s7 = F->step[7];
    const double first = F->first, c0 = F->specials[0], c1 = F->specials[1],
                 q0 = F->special_points[0], q1 = F->special_points[1], m = F->missing,
                 limit = F->code_limit, unseen = F->unseen;
    const double big = 4503599627370496.0;   /* 2**52 */
    for (ptrdiff_t i = 0; i < n; i++) {
        double v = is_float32 ? (double)*(const float *)(col + i * stride)
                              : *(const double *)(col + i * stride);
        double pts = first + (ne > 0 && v >= e0 ? s0 : 0.0) + (ne > 1 && v >= e1 ? s1 : 0.0)
                   + (ne > 2 && v >= e2 ? s2 : 0.0) + (ne > 3 && v >= e3 ? s3 : 0.0)
                   + (ne > 4 && v >= e4 ? s4 : 0.0) + (ne > 5 && v >= e5 ? s5 : 0.0)
                   + (ne > 6 && v >= e6 ? s6 : 0.0) + (ne > 7 && v >= e7 ? s7 : 0.0);
        if (is_codes) {
            int code = (v >= 0.0) & (v <= limit) & ((v + big) - big == v);   /* no branches */
            pts = code ? pts : unseen;
        }
        pts = v == c1 ? q1 : pts;   /* the first matching code wins: c0 last */
        pts = v == c0 ? q0 : pts;
        pts = v != v ? m : pts;     /* NaN: the missing bin */
        total[i] += pts;
        points[i] = pts;            /* for the reason codes; a store is cheaper than a test */
    }
}

/* Fold one feature's losses into each row's k largest, kept sorted: a row's
 * slot r takes the slot above's entry when the loss beats that one, the loss
 * itself when it beats only slot r, else stays. Strict comparisons keep the
 * earlier feature first on ties; a loss must be > 0 to count at all (slots
 * start at loss 0, feature -1). One branch-free pass per slot, bottom up, so
 * every pass reads the slots above before they change. */
QRPAY_INLINE void qrpay_fold_reasons(const double *points, double best, double feature,
                                     double (*top_loss)[QRPAY_BLOCK],
                                     double (*top_feature)[QRPAY_BLOCK], int k, ptrdiff_t n)
{
    for (int r = k - 1; r >= 0; r--) {
        double *tl = top_loss[r], *tf = top_feature[r];
        if (r == 0) {
            for (ptrdiff_t i = 0; i < n; i++) {
                double loss = best - points[i];
                int take = loss > tl[i];
                tf[i] = take ? feature : tf[i];
                tl[i] = take ? loss : tl[i];
            }
        } else {
            const double *ul = top_loss[r - 1], *uf = top_feature[r - 1];
            for (ptrdiff_t i = 0; i < n; i++) {
                double loss = best - points[i];
                int shift = loss > ul[i], take = loss > tl[i];
                tf[i] = shift ? uf[i] : (take ? feature : tf[i]);
                tl[i] = shift ? ul[i] : (take ? loss : tl[i]);
            }
        }
    }
}

#define QRPAY_PASS(NE)                                                                     \
    do {                                                                                   \
        if (F->code_limit >= 0.0) {                                                        \
            if (is_float32)                                                                \
                qrpay_feature_pass(col, row_stride, 1, F, points, total, n, NE, 1);        \
            else                                                                           \
                qrpay_feature_pass(col, row_stride, 0, F, points, total, n, NE, 1);        \
        } else if (is_float32)                                                             \
            qrpay_feature_pass(col, row_stride, 1, F, points, total, n, NE, 0);            \
        else                                                                               \
            qrpay_feature_pass(col, row_stride, 0, F, points, total, n, NE, 0);            \
    } while (0)

#define QRPAY_PASS_CASE(NE) case NE: QRPAY_PASS(NE); break;

/* Ask for the next block's share of this feature while this one is computed:
 * the hardware prefetcher stops at 4 KiB pages, and a block spans several. */
QRPAY_INLINE void qrpay_prefetch_block(const char *X, ptrdiff_t row_stride, ptrdiff_t col_stride,
                                       ptrdiff_t n_features, ptrdiff_t f, ptrdiff_t row)
{
    ptrdiff_t rs = row_stride < 0 ? -row_stride : row_stride;
    ptrdiff_t cs = col_stride < 0 ? -col_stride : col_stride;
    ptrdiff_t dir = row_stride < 0 ? -1 : 1, span;
    const char *from;
    if (rs <= cs) {   /* column-major: this feature's own run of values */
        from = X + row * row_stride + f * col_stride;
        span = QRPAY_BLOCK * rs;
    } else {          /* row-major: this feature's slice of the block's rows */
        span = QRPAY_BLOCK * rs / n_features;
        from = X + row * row_stride + dir * f * span;
    }
    for (ptrdiff_t o = 0; o < span; o += 64) __builtin_prefetch(from + dir * o);
}

/* Threads claim rows in chunks from one shared counter, so a thread whose
 * core is slower (woken late, or shared with another process) takes fewer. */
#define QRPAY_CHUNK_ROWS (16 * QRPAY_BLOCK)

#if defined(_MSC_VER)
#include <intrin.h>
static inline ptrdiff_t qrpay_claim_rows(ptrdiff_t *next)
{
    return (ptrdiff_t)_InterlockedExchangeAdd64((volatile long long *)next, QRPAY_CHUNK_ROWS);
}
#else
static inline ptrdiff_t qrpay_claim_rows(ptrdiff_t *next)
{
    return __atomic_fetch_add(next, (ptrdiff_t)QRPAY_CHUNK_ROWS, __ATOMIC_RELAXED);
}
#endif

/* Scores (and, when k > 0, the k reason codes per row into reasons[row * k + r])
 * for rows [start, end) of X, any strides; X has n_rows rows, and the block
 * after `end` is prefetched too when it exists (the next chunk, often ours). */
QRPAY_CLONES
static void qrpay_score_fast(const char *X, ptrdiff_t row_stride, ptrdiff_t col_stride,
                             int is_float32, const qrpay_fast_feature *features,
                             ptrdiff_t n_features, int64_t base, int64_t *scores,
                             int k, int16_t *reasons, ptrdiff_t start, ptrdiff_t end,
                             ptrdiff_t n_rows)
{
    double total[QRPAY_BLOCK];
    double points[QRPAY_BLOCK];
    double top_loss[QRPAY_MAX_REASONS][QRPAY_BLOCK];
    double top_feature[QRPAY_MAX_REASONS][QRPAY_BLOCK];
    for (ptrdiff_t b0 = start; b0 < end; b0 += QRPAY_BLOCK) {
        ptrdiff_t n = end - b0 < QRPAY_BLOCK ? end - b0 : QRPAY_BLOCK;
        for (ptrdiff_t i = 0; i < n; i++) total[i] = 0.0;
        for (int r = 0; r < k; r++)
            for (ptrdiff_t i = 0; i < n; i++) {
                top_loss[r][i] = 0.0;
                top_feature[r][i] = -1.0;
            }
        for (ptrdiff_t f = 0; f < n_features; f++) {
            const qrpay_fast_feature *F = &features[f];
            const char *col = X + b0 * row_stride + f * col_stride;
            if (b0 + 2 * QRPAY_BLOCK <= n_rows)
                qrpay_prefetch_block(X, row_stride, col_stride, n_features, f, b0 + QRPAY_BLOCK);
            switch (F->n_edges) {
                QRPAY_PASS_CASE(0)
                QRPAY_PASS_CASE(1)
                QRPAY_PASS_CASE(2)
                QRPAY_PASS_CASE(3)
                QRPAY_PASS_CASE(4)
                QRPAY_PASS_CASE(5)
                QRPAY_PASS_CASE(6)
                QRPAY_PASS_CASE(7)
                default: QRPAY_PASS(8);
            }
            if (k) qrpay_fold_reasons(points, F->best, (double)f, top_loss, top_feature, k, n);
        }
        for (ptrdiff_t i = 0; i < n; i++) scores[b0 + i] = base + (int64_t)total[i];
        for (int r = 0; r < k; r++)
            for (ptrdiff_t i = 0; i < n; i++)
                reasons[(b0 + i) * k + r] = (int16_t)top_feature[r][i];
    }
}

#endif
