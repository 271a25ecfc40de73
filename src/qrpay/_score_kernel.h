/* The scorecard fast path: rows in blocks, one feature at a time, and a bin's
 * points as p0 plus the point step of every edge the value reaches, so every
 * inner loop is branch-free and vectorises (no gather). Used by _core.pyx for
 * `score` when every feature has at most 8 edges and 2 special codes;
 * `explain` and larger cards use the row kernel. Points are integers well
 * below 2**53, so summing them in double is exact. */
#ifndef QRPAY_SCORE_KERNEL_H
#define QRPAY_SCORE_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#define QRPAY_FAST_EDGES 8
#define QRPAY_FAST_SPECIALS 2
#define QRPAY_BLOCK 512

typedef struct {
    double edges[QRPAY_FAST_EDGES];   /* ascending, padded with +inf */
    double step[QRPAY_FAST_EDGES];    /* points[j + 1] - points[j]; 0 for padding */
    double first;                     /* points of the first numeric bin */
    double specials[QRPAY_FAST_SPECIALS];  /* padded with NaN, which equals nothing */
    double special_points[QRPAY_FAST_SPECIALS];
    double missing;                   /* points of the NaN bin */
} qrpay_fast_feature;

/* Built twice on x86-64 Linux with GCC (AVX2 and baseline); the loader picks one. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define QRPAY_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QRPAY_CLONES
#endif

QRPAY_CLONES
static void qrpay_score_fast(const char *X, ptrdiff_t row_stride, ptrdiff_t col_stride,
                             int is_float32, const qrpay_fast_feature *features,
                             ptrdiff_t n_features, int64_t base, int64_t *scores,
                             ptrdiff_t start, ptrdiff_t end)
{
    double column[QRPAY_BLOCK];
    double total[QRPAY_BLOCK];
    for (ptrdiff_t b0 = start; b0 < end; b0 += QRPAY_BLOCK) {
        ptrdiff_t n = end - b0 < QRPAY_BLOCK ? end - b0 : QRPAY_BLOCK;
        for (ptrdiff_t i = 0; i < n; i++) total[i] = 0.0;
        for (ptrdiff_t f = 0; f < n_features; f++) {
            const qrpay_fast_feature *F = &features[f];
            const char *p = X + b0 * row_stride + f * col_stride;
            const double *v_in = column;
            /* Copy the column into a contiguous buffer unless it already is one. */
            if (is_float32) {
                for (ptrdiff_t i = 0; i < n; i++) column[i] = *(const float *)(p + i * row_stride);
            } else if (row_stride == (ptrdiff_t)sizeof(double)) {
                v_in = (const double *)p;
            } else {
                for (ptrdiff_t i = 0; i < n; i++) column[i] = *(const double *)(p + i * row_stride);
            }
            const double e0 = F->edges[0], e1 = F->edges[1], e2 = F->edges[2], e3 = F->edges[3],
                         e4 = F->edges[4], e5 = F->edges[5], e6 = F->edges[6], e7 = F->edges[7];
            const double s0 = F->step[0], s1 = F->step[1], s2 = F->step[2], s3 = F->step[3],
                         s4 = F->step[4], s5 = F->step[5], s6 = F->step[6], s7 = F->step[7];
            const double first = F->first, c0 = F->specials[0], c1 = F->specials[1],
                         q0 = F->special_points[0], q1 = F->special_points[1], m = F->missing;
            for (ptrdiff_t i = 0; i < n; i++) {
                double v = v_in[i];
                double pts = first + (v >= e0 ? s0 : 0.0) + (v >= e1 ? s1 : 0.0)
                           + (v >= e2 ? s2 : 0.0) + (v >= e3 ? s3 : 0.0) + (v >= e4 ? s4 : 0.0)
                           + (v >= e5 ? s5 : 0.0) + (v >= e6 ? s6 : 0.0) + (v >= e7 ? s7 : 0.0);
                pts = v == c1 ? q1 : pts;   /* the first matching code wins: c0 last */
                pts = v == c0 ? q0 : pts;
                pts = v != v ? m : pts;     /* NaN: the missing bin */
                total[i] += pts;
            }
        }
        for (ptrdiff_t i = 0; i < n; i++) scores[b0 + i] = base + (int64_t)total[i];
    }
}

#endif
