/* AVX2 + FMA + F16C kernels (x86-64 CPUs from ~2013 on: AMD Zen 1-3, Intel client chips without
 * AVX-512). The block-kernel design of kern_avx512.c with 8-wide vectors and 16 registers.
 * Compiled for that target whatever the build's flags; only called when cpuid reports the features.
 */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>
#define KSUFFIX avx2
#include "kern_generic.h"

#define AI static inline __attribute__((always_inline))
/* Tokens one pass of the block kernels keeps in registers. Measured on a busy 2-core VM, 2 threads:
 * 4 beat 2 and 3 (1.1-1.6x per token); with one partial sum per (row, token) in the nibble
 * kernels (their sums restart every group, so one chain is not latency-bound) 6 beat 4 by 10-20%
 * on int4/nf4 prompts, int8/float neutral (a few per-group sums spill, outside the code loop). */
#define TBMAX 6
/* Rows ahead a kernel prefetches its codes from (one prefetch per 64-byte line), as in
 * kern_avx512.c: the hardware prefetcher alone leaves a decode step's expert rows waiting. */
#define PF 4
#define RC 4  /* rows per pass over the token blocks (re-read from L1 for the next block) */

AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lanes [0, n) all ones: the mask of _mm256_maskload_ps */
AI __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Eight 4-bit codes (int32 lanes) as float32: int4 as the number, nf4 through its 16-entry table
 * (two 8-entry permutes, the code's bit 3 choosing between them). */
AI __m256 nib_f(__m256i q, const int NF, __m256 lut0, __m256 lut1) {
    if (!NF) return _mm256_cvtepi32_ps(q);
    const __m256 lo = _mm256_permutevar8x32_ps(lut0, q), hi = _mm256_permutevar8x32_ps(lut1, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

/* The block kernels: R rows (1 or 2) times TB tokens (1..TBMAX) per call, weights converted to
 * float32 once per call and multiplied with every token. Per (row, token) the operations and their
 * order are the same for every R and TB, so a token's result never depends on what it was batched
 * with: a prompt computes exactly what decoding the same tokens one at a time would. */

/* int4 / nf4, group size a multiple of 32 (G when known at compile time, else 0). x is permuted
 * (16 low-nibble then 16 high-nibble positions per 32-block, see XPrep): bytes 0..7 of a block
 * hold x[0..7] (low nibbles) and x[16..23] (high), bytes 8..15 x[8..15] and x[24..31]. int4 zero
 * points are folded out of the inner loop: s * sum (q - z) x = s * sum q x - s * z * sum x, the
 * group sums of x (XPrep.xs) computed once per call, eight groups per vector. */
AI void nib_block(const WDesc *w, const XPrep *xp, int64_t r, int t0, const int R, const int TB, const int NF,
                  const int64_t G, float *y, int64_t ldy) {
    const __m256i m4 = _mm256_set1_epi32(15);
    const __m256 lut0 = _mm256_loadu_ps(NF4_LUT), lut1 = _mm256_loadu_ps(NF4_LUT + 8);
    const int64_t g = G ? G : w->g, ng = w->ng, len = xp->len;
    const float *x0 = xp->x + t0 * len, *xs0 = xp->xs + t0 * ng;
    const uint8_t *row[2] = {w->codes + r * w->stride, w->codes + (r + R - 1) * w->stride};
    __m256 acc[2][TBMAX];
    float ss[2][8];
    FOR_ROWS(R) FOR_TOKENS(TB) acc[i][t] = _mm256_setzero_ps();
    for (int64_t gc = 0; gc < ng; gc += 8) {
        const int64_t n = ng - gc < 8 ? ng - gc : 8;
        FOR_ROWS(R) {
            float sz[8];
            for (int j = 0; j < 8; j++) {
                ss[i][j] = j < n ? load_scale(w, r + i, gc + j) : 0.0f;
                sz[j] = NF || j >= n ? 0.0f : ss[i][j] * (float)w->zeros[(r + i) * ng + gc + j];
            }
            if (!NF) {
                const __m256 szv = _mm256_loadu_ps(sz);
                const __m256i m = lanes(n);
                FOR_TOKENS(TB)
                    acc[i][t] = _mm256_fnmadd_ps(szv, _mm256_maskload_ps(xs0 + t * ng + gc, m), acc[i][t]);
            }
        }
        for (int64_t gi = gc; gi < gc + n; gi++) {
            const float *xg = x0 + gi * g;
            __m256 d[2][TBMAX];  /* the group's sum, one per (row, token) */
            FOR_ROWS(R) FOR_TOKENS(TB) d[i][t] = _mm256_setzero_ps();
            for (int64_t k = 0; k < g; k += 32) {
                FOR_ROWS(R) {
                    const uint8_t *p = row[i] + (gi * g + k) / 2;
                    if ((k & 127) == 0) _mm_prefetch((const char *)(p + PF * w->stride), _MM_HINT_T0);
                    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
                    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                    __m256 f = nib_f(_mm256_and_si256(v0, m4), NF, lut0, lut1);
                    FOR_TOKENS(TB) d[i][t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xg + t * len + k), d[i][t]);
                    f = nib_f(_mm256_and_si256(v1, m4), NF, lut0, lut1);
                    FOR_TOKENS(TB) d[i][t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xg + t * len + k + 8), d[i][t]);
                    f = nib_f(_mm256_srli_epi32(v0, 4), NF, lut0, lut1);
                    FOR_TOKENS(TB) d[i][t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xg + t * len + k + 16), d[i][t]);
                    f = nib_f(_mm256_srli_epi32(v1, 4), NF, lut0, lut1);
                    FOR_TOKENS(TB) d[i][t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xg + t * len + k + 24), d[i][t]);
                }
            }
            FOR_ROWS(R) {
                const __m256 sv = _mm256_set1_ps(ss[i][gi - gc]);
                FOR_TOKENS(TB) acc[i][t] = _mm256_fmadd_ps(sv, d[i][t], acc[i][t]);
            }
        }
    }
    FOR_ROWS(R) FOR_TOKENS(TB) y[(t0 + t) * ldy + r + i] = hsum256(acc[i][t]);
}

/* 16 consecutive weights of an int8 or float-kind row from element e, as two float32 vectors. */
AI void load16_w(int kind, const uint8_t *row, int64_t e, __m256 *a, __m256 *b) {
    if (kind == K_INT8) {
        const int8_t *p = (const int8_t *)row + e;
        *a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
        *b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    } else if (kind == K_F32) {
        *a = _mm256_loadu_ps((const float *)row + e);
        *b = _mm256_loadu_ps((const float *)row + e + 8);
    } else {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + e));
        const __m128i h0 = _mm256_castsi256_si128(h), h1 = _mm256_extracti128_si256(h, 1);
        if (kind == K_F16) { *a = _mm256_cvtph_ps(h0); *b = _mm256_cvtph_ps(h1); return; }
        *a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
        *b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
    }
}

AI int esize(int kind) { return kind == K_F32 ? 4 : kind == K_INT8 ? 1 : 2; }

/* int8 (one scale per group; per channel: one group) and float kinds (one "group": the row, scale
 * 1); the kind is a compile-time constant (no dispatch in the inner loop). A group's last n < 16
 * weights are copied to a zeroed buffer and x read through a lane mask, so nothing past a row or
 * a token is read. */
AI void lin_block(const WDesc *w, const XPrep *xp, int64_t r, int t0, const int R, const int TB, const int kind,
                  float *y, int64_t ldy) {
    const int FL = kind != K_INT8, es = esize(kind);
    const int64_t g = FL ? w->cols : w->g, ng = FL ? 1 : w->ng, len = xp->len, cols = w->cols;
    const float *x0 = xp->x + t0 * len;
    const uint8_t *row[2] = {w->codes + r * w->stride, w->codes + (r + R - 1) * w->stride};
    __m256 acc[2][TBMAX];
    FOR_ROWS(R) FOR_TOKENS(TB) acc[i][t] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < ng; gi++) {
        const int64_t i0 = gi * g, gw = cols - i0 < g ? cols - i0 : g;
        __m256 d0[2][TBMAX], d1[2][TBMAX];
        FOR_ROWS(R) FOR_TOKENS(TB) d0[i][t] = d1[i][t] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= gw; k += 16) {
            FOR_ROWS(R) {
                __m256 a, b;
                const int64_t off = (i0 + k) * es;  /* byte offset: one prefetch per 64-byte line */
                if ((off & 63) < 16 * es) _mm_prefetch((const char *)(row[i] + off + PF * w->stride), _MM_HINT_T0);
                load16_w(kind, row[i], i0 + k, &a, &b);
                FOR_TOKENS(TB) {
                    const float *xt = x0 + t * len + i0 + k;
                    d0[i][t] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xt), d0[i][t]);
                    d1[i][t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xt + 8), d1[i][t]);
                }
            }
        }
        if (k < gw) {
            const int64_t n = gw - k;
            const __m256i m0 = lanes(n), m1 = lanes(n - 8);
            FOR_ROWS(R) {
                uint8_t tail[64] __attribute__((aligned(32))) = {0};
                memcpy(tail, row[i] + (i0 + k) * es, (size_t)(n * es));
                __m256 a, b;
                load16_w(kind, tail, 0, &a, &b);
                FOR_TOKENS(TB) {
                    const float *xt = x0 + t * len + i0 + k;
                    d0[i][t] = _mm256_fmadd_ps(a, _mm256_maskload_ps(xt, m0), d0[i][t]);
                    d1[i][t] = _mm256_fmadd_ps(b, _mm256_maskload_ps(xt + 8, m1), d1[i][t]);
                }
            }
        }
        FOR_ROWS(R) {
            const __m256 sv = _mm256_set1_ps(FL ? 1.0f : load_scale(w, r + i, gi));
            FOR_TOKENS(TB)
                acc[i][t] = FL ? _mm256_add_ps(d0[i][t], d1[i][t]) : _mm256_fmadd_ps(sv, _mm256_add_ps(d0[i][t], d1[i][t]), acc[i][t]);
        }
    }
    FOR_ROWS(R) FOR_TOKENS(TB) y[(t0 + t) * ldy + r + i] = hsum256(acc[i][t]);
}

typedef void (*block_fn)(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy);

/* One function per (family, R, TB): the compiler specialises each body (registers, unrolling).
 * Index 0: two rows of one token (decode), index tb: one row of tb tokens. */
#define BLK(FAM, N, R, TB) \
    static void FAM##_##N(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL_##FAM(R, TB); }
#if TBMAX == 2
#define BLOCKS(FAM) BLK(FAM, r2, 2, 1) BLK(FAM, 1, 1, 1) BLK(FAM, 2, 1, 2) \
    static const block_fn FAM[TBMAX + 1] = {FAM##_r2, FAM##_1, FAM##_2};
#elif TBMAX == 3
#define BLOCKS(FAM) BLK(FAM, r2, 2, 1) BLK(FAM, 1, 1, 1) BLK(FAM, 2, 1, 2) BLK(FAM, 3, 1, 3) \
    static const block_fn FAM[TBMAX + 1] = {FAM##_r2, FAM##_1, FAM##_2, FAM##_3};
#elif TBMAX == 4
#define BLOCKS(FAM) BLK(FAM, r2, 2, 1) BLK(FAM, 1, 1, 1) BLK(FAM, 2, 1, 2) BLK(FAM, 3, 1, 3) BLK(FAM, 4, 1, 4) \
    static const block_fn FAM[TBMAX + 1] = {FAM##_r2, FAM##_1, FAM##_2, FAM##_3, FAM##_4};
#else
#define BLOCKS(FAM) BLK(FAM, r2, 2, 1) BLK(FAM, 1, 1, 1) BLK(FAM, 2, 1, 2) BLK(FAM, 3, 1, 3) BLK(FAM, 4, 1, 4) BLK(FAM, 5, 1, 5) BLK(FAM, 6, 1, 6) \
    static const block_fn FAM[TBMAX + 1] = {FAM##_r2, FAM##_1, FAM##_2, FAM##_3, FAM##_4, FAM##_5, FAM##_6};
#endif

#define CALL_b_i4g32(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 32, y, ldy)
#define CALL_b_i4g64(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 64, y, ldy)
#define CALL_b_i4g128(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 128, y, ldy)
#define CALL_b_i4any(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 0, y, ldy)
#define CALL_b_nf4(R, TB) nib_block(w, xp, r, t0, R, TB, 1, 0, y, ldy)
#define CALL_b_i8(R, TB) lin_block(w, xp, r, t0, R, TB, K_INT8, y, ldy)
#define CALL_b_f32(R, TB) lin_block(w, xp, r, t0, R, TB, K_F32, y, ldy)
#define CALL_b_bf16(R, TB) lin_block(w, xp, r, t0, R, TB, K_BF16, y, ldy)
#define CALL_b_f16(R, TB) lin_block(w, xp, r, t0, R, TB, K_F16, y, ldy)
BLOCKS(b_i4g32)
BLOCKS(b_i4g64)
BLOCKS(b_i4g128)
BLOCKS(b_i4any)
BLOCKS(b_nf4)
BLOCKS(b_i8)
BLOCKS(b_f32)
BLOCKS(b_bf16)
BLOCKS(b_f16)

static const block_fn *blocks_for(const WDesc *w) {
    switch (w->kind) {
    case K_INT4:
        if (w->g % 32) return NULL;
        return w->g == 32 ? b_i4g32 : w->g == 64 ? b_i4g64 : w->g == 128 ? b_i4g128 : b_i4any;
    case K_NF4: return w->g % 32 ? NULL : b_nf4;
    case K_INT8: return b_i8;
    case K_F32: return b_f32;
    case K_BF16: return b_bf16;
    case K_F16: return b_f16;
    default: return NULL;
    }
}

static void rows_avx2(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const block_fn *f = blocks_for(w);
    if (!f) { rows_generic_avx2(w, xp, r0, r1, y, ldy); return; }
    const int T = xp->T;
    if (T == 1) {  /* decode: rows in pairs (x loaded once for both), an odd last row alone */
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) f[0](w, xp, r, 0, y, ldy);
        if (r < r1) f[1](w, xp, r, 0, y, ldy);
        return;
    }
    for (int64_t rb = r0; rb < r1; rb += RC) {
        const int64_t re = rb + RC < r1 ? rb + RC : r1;
        for (int t0 = 0; t0 < T; t0 += TBMAX) {
            const int tb = T - t0 < TBMAX ? T - t0 : TBMAX;
            for (int64_t r = rb; r < re; r++) f[tb](w, xp, r, t0, y, ldy);
        }
    }
}

/* W[r0:r1] as float32 in natural order for the GEMM path: (code - zero) * scale exactly as
 * dequant_generic computes it (the integer difference is exact in float32). Nibble kinds: 8 bytes
 * are split into low/high nibbles and interleaved back (unpacklo_epi8) into 16 codes. */
static void dequant_avx2(const WDesc *w, int64_t r0, int64_t r1, float *out) {
    const int nib = w->kind == K_INT4 || w->kind == K_NF4;
    if (!(nib && w->g % 2 == 0) && w->kind != K_INT8 && w->kind != K_BF16) {
        dequant_generic_avx2(w, r0, r1, out);
        return;
    }
    const int64_t cols = w->cols, g = w->g;
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256 lut0 = _mm256_loadu_ps(NF4_LUT), lut1 = _mm256_loadu_ps(NF4_LUT + 8);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        float *o = out + (r - r0) * cols;
        if (w->kind == K_BF16) {
            int64_t i = 0;
            for (; i + 16 <= cols; i += 16) {
                __m256 a, b;
                load16_w(K_BF16, row, i, &a, &b);
                _mm256_storeu_ps(o + i, a);
                _mm256_storeu_ps(o + i + 8, b);
            }
            for (; i < cols; i++) o[i] = bf16_to_f32(((const uint16_t *)row)[i]);
            continue;
        }
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const int64_t i0 = gi * g, i1 = i0 + g < cols ? i0 + g : cols;
            const float sc = load_scale(w, r, gi);
            const __m256 s = _mm256_set1_ps(sc);
            int64_t i = i0;
            if (w->kind == K_INT8) {
                for (; i + 16 <= i1; i += 16) {
                    __m256 a, b;
                    load16_w(K_INT8, row, i, &a, &b);
                    _mm256_storeu_ps(o + i, _mm256_mul_ps(a, s));
                    _mm256_storeu_ps(o + i + 8, _mm256_mul_ps(b, s));
                }
                for (; i < i1; i++) o[i] = (float)((const int8_t *)row)[i] * sc;
                continue;
            }
            const int zi = w->kind == K_INT4 ? w->zeros[r * w->ng + gi] : 0;
            const __m256i z = _mm256_set1_epi32(zi);
            for (; i + 16 <= i1; i += 16) {
                const __m128i b = _mm_loadl_epi64((const __m128i *)(row + i / 2));
                const __m128i q = _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
                const __m256i qa = _mm256_cvtepu8_epi32(q), qb = _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8));
                __m256 fa, fb;
                if (w->kind == K_NF4) { fa = nib_f(qa, 1, lut0, lut1); fb = nib_f(qb, 1, lut0, lut1); }
                else { fa = _mm256_cvtepi32_ps(_mm256_sub_epi32(qa, z)); fb = _mm256_cvtepi32_ps(_mm256_sub_epi32(qb, z)); }
                _mm256_storeu_ps(o + i, _mm256_mul_ps(fa, s));
                _mm256_storeu_ps(o + i + 8, _mm256_mul_ps(fb, s));
            }
            for (; i < i1; i++) {
                const int q = (row[i >> 1] >> ((i & 1) * 4)) & 15;
                o[i] = (w->kind == K_NF4 ? NF4_LUT[q] : (float)q - (float)zi) * sc;
            }
        }
    }
}

const IsaKernels kern_avx2 = {"avx2", rows_avx2, dequant_avx2};
#endif
