/* AVX-512 kernels (F + BW + VL + DQ, FMA, F16C). Compiled for that target whatever the build's
 * flags; only called when cpuid reports the features (see _cpu.c).
 *
 * int4, nf4 (group size a multiple of 32), int8 and float weights go through the block kernels
 * below (any batch: a decode step's rows in pairs, a prompt's tokens 4 at a time per row); the
 * dequantize for the GEMM path is vectorised too. Ternary and odd group sizes use the generic
 * kernels compiled for this target.
 */
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
#include <immintrin.h>
#define KSUFFIX avx512
#include "kern_generic.h"

/* The scales (and zero-point terms) of up to 16 groups of a row as float32 vectors: per-group
 * scalar work hoisted out of the group loop. */
static inline __m512 load_scales16(const WDesc *w, int64_t r, int64_t gc, __mmask16 m) {
    const void *base = (const uint8_t *)w->scales + (r * w->ng + gc) * (w->sdt == S_F32 ? 4 : 2);
    if (w->sdt == S_F32) return _mm512_maskz_loadu_ps(m, base);
    __m256i h = _mm256_maskz_loadu_epi16(m, base);
    if (w->sdt == S_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define AI static inline __attribute__((always_inline))
/* Rows ahead a kernel prefetches its codes from (one prefetch per 64-byte line): the hardware
 * prefetcher alone leaves a decode step's expert rows waiting on memory (measured: a top-8 MoE layer
 * of 768x2048 int4 experts 2.1 ms -> 1.3 ms per token at 2 threads; 2..16 rows ahead all similar). */
#define PF 4
#define TBMAX 4  /* tokens one pass of the block kernels keeps in registers */
#define RC 4     /* rows per pass over the token blocks (re-read from L1 for the next block) */

/* The block kernels: R rows (1 or 2) times TB tokens (1..TBMAX) per call, weights converted to
 * float32 once per call and multiplied with every token. Per (row, token) the operations and their
 * order are the same for every R and TB, so a token's result never depends on what it was batched
 * with: a prompt computes exactly what decoding the same tokens one at a time would. */

/* int4 / nf4, group size a multiple of 32 (G when known at compile time, else 0). x is permuted
 * (16 low-nibble then 16 high-nibble positions per 32-block, see XPrep). int4 zero points are
 * folded out of the inner loop: s * sum (q - z) x = s * sum q x - s * z * sum x, the group sums
 * of x (XPrep.xs) computed once per call. */
AI void nib_block(const WDesc *w, const XPrep *xp, int64_t r, int t0, const int R, const int TB, const int NF,
                  const int64_t G, float *y, int64_t ldy) {
    const __m512i m4 = _mm512_set1_epi32(15);
    const __m512 lut = _mm512_loadu_ps(NF4_LUT);
    const int64_t g = G ? G : w->g, ng = w->ng, len = xp->len;
    const float *x0 = xp->x + t0 * len, *xs0 = xp->xs + t0 * ng;
    const uint8_t *row[2] = {w->codes + r * w->stride, w->codes + (r + R - 1) * w->stride};
    __m512 acc[2][TBMAX];
    float ss[2][16];
    FOR_ROWS(R) FOR_TOKENS(TB) acc[i][t] = _mm512_setzero_ps();
    for (int64_t gc = 0; gc < ng; gc += 16) {
        const int64_t n = ng - gc < 16 ? ng - gc : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        FOR_ROWS(R) {
            const __m512 s = load_scales16(w, r + i, gc, m);
            _mm512_storeu_ps(ss[i], s);
            if (!NF) {
                const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w->zeros + (r + i) * ng + gc)));
                const __m512 sz = _mm512_mul_ps(s, z);
                FOR_TOKENS(TB)
                    acc[i][t] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(m, xs0 + t * ng + gc), acc[i][t]);
            }
        }
        for (int64_t gi = gc; gi < gc + n; gi++) {
            const float *xg = x0 + gi * g;
            __m512 d0[2][TBMAX], d1[2][TBMAX];
            FOR_ROWS(R) FOR_TOKENS(TB) d0[i][t] = d1[i][t] = _mm512_setzero_ps();
            for (int64_t k = 0; k < g; k += 32) {
                FOR_ROWS(R) {
                    if ((k & 127) == 0) _mm_prefetch((const char *)(row[i] + (gi * g + k) / 2 + PF * w->stride), _MM_HINT_T0);
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row[i] + (gi * g + k) / 2)));
                    const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi32(v, 4);
                    const __m512 flo = NF ? _mm512_permutexvar_ps(lo, lut) : _mm512_cvtepi32_ps(lo);
                    const __m512 fhi = NF ? _mm512_permutexvar_ps(hi, lut) : _mm512_cvtepi32_ps(hi);
                    FOR_TOKENS(TB) {
                        d0[i][t] = _mm512_fmadd_ps(flo, _mm512_loadu_ps(xg + t * len + k), d0[i][t]);
                        d1[i][t] = _mm512_fmadd_ps(fhi, _mm512_loadu_ps(xg + t * len + k + 16), d1[i][t]);
                    }
                }
            }
            FOR_ROWS(R) {
                const __m512 sv = _mm512_set1_ps(ss[i][gi - gc]);
                FOR_TOKENS(TB) acc[i][t] = _mm512_fmadd_ps(sv, _mm512_add_ps(d0[i][t], d1[i][t]), acc[i][t]);
            }
        }
    }
    FOR_ROWS(R) FOR_TOKENS(TB) y[(t0 + t) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

/* Up to 32 consecutive codes from p as two float32 vectors (lanes past n: 0, nothing read). */
AI void load32_i8(const int8_t *p, int64_t n, __m512 *a, __m512 *b) {
    if (n >= 32) {
        *a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
        *b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
        return;
    }
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
    *a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, p)));
    *b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, p + 16)));
}

/* float32 / bf16 / fp16 weights: up to 32 consecutive ones from element i of row. */
AI __m512 load16_w(int kind, const uint8_t *row, int64_t i, __mmask16 m) {
    if (kind == K_F32) return _mm512_maskz_loadu_ps(m, (const float *)row + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + i);
    if (kind == K_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AI void load32_f(int kind, const uint8_t *row, int64_t i, int64_t n, __m512 *a, __m512 *b) {
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n >= 32 ? 0xffff : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
    *a = load16_w(kind, row, i, m0);
    *b = load16_w(kind, row, i + 16, m1);
}

/* x lanes [k, k + n) of a token, two vectors (lanes past n: 0) */
AI void load32_x(const float *x, int64_t n, __m512 *a, __m512 *b) {
    if (n >= 32) { *a = _mm512_loadu_ps(x); *b = _mm512_loadu_ps(x + 16); return; }
    const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
    const __mmask16 m1 = n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1);
    *a = _mm512_maskz_loadu_ps(m0, x);
    *b = _mm512_maskz_loadu_ps(m1, x + 16);
}

/* int8 (one scale per group; per channel: one group) and float kinds (one "group": the row, scale 1). */
AI void lin_block(const WDesc *w, const XPrep *xp, int64_t r, int t0, const int R, const int TB, const int FL,
                  float *y, int64_t ldy) {
    const int64_t g = FL ? w->cols : w->g, ng = FL ? 1 : w->ng, len = xp->len, cols = w->cols;
    const float *x0 = xp->x + t0 * len;
    const uint8_t *row[2] = {w->codes + r * w->stride, w->codes + (r + R - 1) * w->stride};
    __m512 acc[2][TBMAX];
    FOR_ROWS(R) FOR_TOKENS(TB) acc[i][t] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < ng; gi++) {
        const int64_t i0 = gi * g, gw = cols - i0 < g ? cols - i0 : g;
        __m512 d0[2][TBMAX], d1[2][TBMAX];
        FOR_ROWS(R) FOR_TOKENS(TB) d0[i][t] = d1[i][t] = _mm512_setzero_ps();
        for (int64_t k = 0; k < gw; k += 32) {
            const int64_t n = gw - k;
            FOR_ROWS(R) {
                __m512 a, b;
                const int64_t off = FL ? (i0 + k) * (w->kind == K_F32 ? 4 : 2) : i0 + k;  /* byte offset */
                if ((off & 63) == 0) _mm_prefetch((const char *)(row[i] + off + PF * w->stride), _MM_HINT_T0);
                if (FL) load32_f(w->kind, row[i], i0 + k, n, &a, &b);
                else load32_i8((const int8_t *)row[i] + i0 + k, n, &a, &b);
                FOR_TOKENS(TB) {
                    __m512 xa, xb;
                    load32_x(x0 + t * len + i0 + k, n, &xa, &xb);
                    d0[i][t] = _mm512_fmadd_ps(a, xa, d0[i][t]);
                    d1[i][t] = _mm512_fmadd_ps(b, xb, d1[i][t]);
                }
            }
        }
        FOR_ROWS(R) {
            const __m512 sv = _mm512_set1_ps(FL ? 1.0f : load_scale(w, r + i, gi));
            FOR_TOKENS(TB)
                acc[i][t] = FL ? _mm512_add_ps(d0[i][t], d1[i][t]) : _mm512_fmadd_ps(sv, _mm512_add_ps(d0[i][t], d1[i][t]), acc[i][t]);
        }
    }
    FOR_ROWS(R) FOR_TOKENS(TB) y[(t0 + t) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

typedef void (*block_fn)(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy);

/* One function per (family, R, TB): the compiler specialises each body (registers, unrolling). */
#define BLOCKS(FAM, CALL)                                                                      \
    static void FAM##_r2(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL(2, 1); } \
    static void FAM##_1(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL(1, 1); } \
    static void FAM##_2(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL(1, 2); } \
    static void FAM##_3(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL(1, 3); } \
    static void FAM##_4(const WDesc *w, const XPrep *xp, int64_t r, int t0, float *y, int64_t ldy) { CALL(1, 4); } \
    static const block_fn FAM[TBMAX + 2] = {FAM##_r2, FAM##_1, FAM##_2, FAM##_3, FAM##_4};

#define C_I4G32(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 32, y, ldy)
#define C_I4G64(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 64, y, ldy)
#define C_I4G128(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 128, y, ldy)
#define C_I4ANY(R, TB) nib_block(w, xp, r, t0, R, TB, 0, 0, y, ldy)
#define C_NF4(R, TB) nib_block(w, xp, r, t0, R, TB, 1, 0, y, ldy)
#define C_I8(R, TB) lin_block(w, xp, r, t0, R, TB, 0, y, ldy)
#define C_FL(R, TB) lin_block(w, xp, r, t0, R, TB, 1, y, ldy)
BLOCKS(b_i4g32, C_I4G32)
BLOCKS(b_i4g64, C_I4G64)
BLOCKS(b_i4g128, C_I4G128)
BLOCKS(b_i4any, C_I4ANY)
BLOCKS(b_nf4, C_NF4)
BLOCKS(b_i8, C_I8)
BLOCKS(b_fl, C_FL)

static const block_fn *blocks_for(const WDesc *w) {
    switch (w->kind) {
    case K_INT4:
        if (w->g % 32) return NULL;
        return w->g == 32 ? b_i4g32 : w->g == 64 ? b_i4g64 : w->g == 128 ? b_i4g128 : b_i4any;
    case K_NF4: return w->g % 32 ? NULL : b_nf4;
    case K_INT8: return b_i8;
    case K_F32: case K_BF16: case K_F16: return b_fl;
    default: return NULL;
    }
}

/* W[r0:r1] as float32 in natural order for the GEMM path: (code - zero) * scale as the reference
 * computes it; nibble kinds interleave low/high nibbles back with one permute per 16 codes. */
static void dequant_avx512(const WDesc *w, int64_t r0, int64_t r1, float *out) {
    const int nib = w->kind == K_INT4 || w->kind == K_NF4;
    if (!(nib && w->g % 32 == 0) && w->kind != K_INT8 && w->kind != K_BF16) {
        dequant_generic_avx512(w, r0, r1, out);
        return;
    }
    const int64_t cols = w->cols, g = w->g;
    const __m512i m4 = _mm512_set1_epi32(15);
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 lut = _mm512_loadu_ps(NF4_LUT);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        float *o = out + (r - r0) * cols;
        if (w->kind == K_BF16) {
            int64_t i = 0;
            for (; i + 16 <= cols; i += 16) _mm512_storeu_ps(o + i, load16_w(K_BF16, row, i, 0xffff));
            for (; i < cols; i++) o[i] = bf16_to_f32(((const uint16_t *)row)[i]);
            continue;
        }
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const int64_t i0 = gi * g, i1 = i0 + g < cols ? i0 + g : cols;
            const __m512 s = _mm512_set1_ps(load_scale(w, r, gi));
            int64_t i = i0;
            if (w->kind == K_INT8) {
                for (; i + 16 <= i1; i += 16)
                    _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                               _mm_loadu_si128((const __m128i *)(row + i)))), s));
                for (; i < i1; i++) o[i] = (float)((const int8_t *)row)[i] * load_scale(w, r, gi);
                continue;
            }
            const __m512i z = _mm512_set1_epi32(w->kind == K_INT4 ? w->zeros[r * w->ng + gi] : 0);
            for (; i + 32 <= i1; i += 32) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i / 2)));
                const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi32(v, 4);
                const __m512i a = _mm512_permutex2var_epi32(lo, ilo, hi), b = _mm512_permutex2var_epi32(lo, ihi, hi);
                __m512 fa, fb;
                if (w->kind == K_NF4) { fa = _mm512_permutexvar_ps(a, lut); fb = _mm512_permutexvar_ps(b, lut); }
                else { fa = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, z)); fb = _mm512_cvtepi32_ps(_mm512_sub_epi32(b, z)); }
                _mm512_storeu_ps(o + i, _mm512_mul_ps(fa, s));
                _mm512_storeu_ps(o + i + 16, _mm512_mul_ps(fb, s));
            }
            const float sc = load_scale(w, r, gi), zf = (float)(w->kind == K_INT4 ? w->zeros[r * w->ng + gi] : 0);
            for (; i < i1; i++) {
                const int q = (row[i >> 1] >> ((i & 1) * 4)) & 15;
                o[i] = (w->kind == K_NF4 ? NF4_LUT[q] : (float)q - zf) * sc;
            }
        }
    }
}

static void rows_avx512(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const block_fn *f = blocks_for(w);
    if (!f) { rows_generic_avx512(w, xp, r0, r1, y, ldy); return; }
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

const IsaKernels kern_avx512 = {"avx512", rows_avx512, dequant_avx512};
#endif
