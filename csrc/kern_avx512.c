/* AVX-512 kernels (F + BW + VL + DQ, FMA, F16C). Compiled for that target whatever the build's
 * flags; only called when cpuid reports the features (see _cpu.c).
 *
 * Batch 1 (decode) has hand-written row kernels: each reads a weight row once and multiplies its
 * codes, converted to float32 in registers, with x. Zero points are folded out of the inner loop:
 * sum_g s_g * (sum_i q_i x_i - z_g * sum_i x_i), the group sums of x computed once per call.
 * Other batches and kinds use the generic kernels compiled for this target.
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

/* One group of G codes (G a multiple of 32): 16 bytes = 32 codes per step, x permuted (16 evens,
 * 16 odds per 32-block, see XPrep). */
#define NIB_GROUP(G, NF)                                                                       \
    do {                                                                                       \
        __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();                             \
        for (int64_t k = 0; k < (G); k += 32) {                                                \
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2)));   \
            __m512i lo = _mm512_sub_epi32(_mm512_and_si512(v, m4), zv);                        \
            __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), zv);                        \
            __m512 flo = (NF) ? _mm512_permutexvar_ps(lo, lut) : _mm512_cvtepi32_ps(lo);       \
            __m512 fhi = (NF) ? _mm512_permutexvar_ps(hi, lut) : _mm512_cvtepi32_ps(hi);       \
            d0 = _mm512_fmadd_ps(flo, _mm512_loadu_ps(xg + k), d0);                            \
            d1 = _mm512_fmadd_ps(fhi, _mm512_loadu_ps(xg + k + 16), d1);                       \
        }                                                                                      \
        acc = _mm512_fmadd_ps(_mm512_set1_ps(ss[gi - gc]), _mm512_add_ps(d0, d1), acc);         \
    } while (0)

/* One group of G codes of two rows at once (x loaded once for both); per row the same operations
 * as NIB_GROUP, so a row's result does not depend on whether it was paired. */
#define NIB_GROUP2(G, NF)                                                                      \
    do {                                                                                       \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                             \
        __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();                             \
        for (int64_t k = 0; k < (G); k += 32) {                                                \
            const __m512 x0 = _mm512_loadu_ps(xg + k), x1 = _mm512_loadu_ps(xg + k + 16);      \
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k / 2)));   \
            __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pb + k / 2)));  \
            __m512i vl = _mm512_sub_epi32(_mm512_and_si512(v, m4), zv);                        \
            __m512i vh = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), zv);                        \
            __m512i ul = _mm512_sub_epi32(_mm512_and_si512(u, m4), zvb);                       \
            __m512i uh = _mm512_sub_epi32(_mm512_srli_epi32(u, 4), zvb);                       \
            a0 = _mm512_fmadd_ps((NF) ? _mm512_permutexvar_ps(vl, lut) : _mm512_cvtepi32_ps(vl), x0, a0); \
            a1 = _mm512_fmadd_ps((NF) ? _mm512_permutexvar_ps(vh, lut) : _mm512_cvtepi32_ps(vh), x1, a1); \
            b0 = _mm512_fmadd_ps((NF) ? _mm512_permutexvar_ps(ul, lut) : _mm512_cvtepi32_ps(ul), x0, b0); \
            b1 = _mm512_fmadd_ps((NF) ? _mm512_permutexvar_ps(uh, lut) : _mm512_cvtepi32_ps(uh), x1, b1); \
        }                                                                                      \
        acc = _mm512_fmadd_ps(_mm512_set1_ps(ss[gi - gc]), _mm512_add_ps(a0, a1), acc);         \
        accb = _mm512_fmadd_ps(_mm512_set1_ps(ssb[gi - gc]), _mm512_add_ps(b0, b1), accb);      \
    } while (0)

/* int4 / nf4 rows, batch 1, group size a multiple of 32 (G: the group size when known at compile
 * time, 0 for any multiple of 32); rows in pairs, an odd last row alone. */
#define NIB_KERNEL(NAME, G, NF)                                                                        \
static void NAME(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {                  \
    const __m512i m4 = _mm512_set1_epi32(15);                                                          \
    const __m512 lut = _mm512_loadu_ps(NF4_LUT);                                                       \
    const int64_t g = (G) ? (G) : w->g, ng = w->ng;                                                    \
    float ss[16], ssb[16];                                                                             \
    int64_t r = r0;                                                                                    \
    for (; r + 2 <= r1; r += 2) {                                                                      \
        const uint8_t *row = w->codes + r * w->stride, *rowb = row + w->stride;                        \
        __m512 acc = _mm512_setzero_ps(), accb = _mm512_setzero_ps();                                  \
        for (int64_t gc = 0; gc < ng; gc += 16) {                                                      \
            const int64_t n = ng - gc < 16 ? ng - gc : 16;                                             \
            const __mmask16 m = (__mmask16)((1u << n) - 1);                                            \
            const __m512 s = load_scales16(w, r, gc, m), sb = load_scales16(w, r + 1, gc, m);          \
            _mm512_storeu_ps(ss, s);                                                                   \
            _mm512_storeu_ps(ssb, sb);                                                                 \
            for (int64_t gi = gc; gi < gc + n; gi++) {                                                 \
                const uint8_t *p = row + gi * g / 2, *pb = rowb + gi * g / 2;                          \
                const float *xg = xp->x + gi * g;                                                      \
                const __m512i zv = _mm512_set1_epi32((NF) ? 0 : w->zeros[r * ng + gi]);              \
                const __m512i zvb = _mm512_set1_epi32((NF) ? 0 : w->zeros[(r + 1) * ng + gi]);        \
                NIB_GROUP2(g, NF);                                                                     \
            }                                                                                          \
        }                                                                                              \
        y[r] = _mm512_reduce_add_ps(acc);                                                              \
        y[r + 1] = _mm512_reduce_add_ps(accb);                                                         \
    }                                                                                                  \
    for (; r < r1; r++) {                                                                              \
        const uint8_t *row = w->codes + r * w->stride;                                                 \
        __m512 acc = _mm512_setzero_ps();                                                              \
        for (int64_t gc = 0; gc < ng; gc += 16) {                                                      \
            const int64_t n = ng - gc < 16 ? ng - gc : 16;                                             \
            const __mmask16 m = (__mmask16)((1u << n) - 1);                                            \
            const __m512 s = load_scales16(w, r, gc, m);                                               \
            _mm512_storeu_ps(ss, s);                                                                   \
            for (int64_t gi = gc; gi < gc + n; gi++) {                                                 \
                const uint8_t *p = row + gi * g / 2;                                                   \
                const float *xg = xp->x + gi * g;                                                      \
                const __m512i zv = _mm512_set1_epi32((NF) ? 0 : w->zeros[r * ng + gi]);              \
                NIB_GROUP(g, NF);                                                                      \
            }                                                                                          \
        }                                                                                              \
        y[r] = _mm512_reduce_add_ps(acc);                                                              \
    }                                                                                                  \
}

NIB_KERNEL(rows1_int4_g32, 32, 0)
NIB_KERNEL(rows1_int4_g64, 64, 0)
NIB_KERNEL(rows1_int4_g128, 128, 0)
NIB_KERNEL(rows1_int4_any, 0, 0)
NIB_KERNEL(rows1_nf4_any, 0, 1)

static void rows1_nibbles(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    if (w->kind == K_NF4) rows1_nf4_any(w, xp, r0, r1, y);
    else if (w->g == 64) rows1_int4_g64(w, xp, r0, r1, y);
    else if (w->g == 32) rows1_int4_g32(w, xp, r0, r1, y);
    else if (w->g == 128) rows1_int4_g128(w, xp, r0, r1, y);
    else rows1_int4_any(w, xp, r0, r1, y);
}

/* int8 row, batch 1: 16 codes per step, one scale per group (per-channel: one group). */
static void rows1_int8(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = (const int8_t *)(w->codes + r * w->stride);
        __m512 acc = _mm512_setzero_ps();
        float sacc = 0.0f;
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const int64_t i0 = gi * w->g, gw = group_width_avx512(w, gi);
            const int8_t *p = row + i0;
            const float *xg = xp->x + i0;
            __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= gw; k += 32) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + k))));
                __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + k + 16))));
                d0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(xg + k), d0);
                d1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(xg + k + 16), d1);
            }
            if (k + 16 <= gw) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + k))));
                d0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(xg + k), d0);
                k += 16;
            }
            float dt = 0.0f;
            for (; k < gw; k++) dt += (float)p[k] * xg[k];
            const float s = load_scale(w, r, gi);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_add_ps(d0, d1), acc);
            sacc += s * dt;
        }
        y[r] = _mm512_reduce_add_ps(acc) + sacc;
    }
}

/* float row (f32 / bf16 / f16 weights), batch 1: 32 weights per step. */
static inline __m512 load16_w(int kind, const uint8_t *row, int64_t i) {
    if (kind == K_F32) return _mm512_loadu_ps((const float *)row + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    if (kind == K_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static void rows1_float(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    const int64_t n = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            d0 = _mm512_fmadd_ps(load16_w(w->kind, row, i), _mm512_loadu_ps(xp->x + i), d0);
            d1 = _mm512_fmadd_ps(load16_w(w->kind, row, i + 16), _mm512_loadu_ps(xp->x + i + 16), d1);
        }
        if (i + 16 <= n) {
            d0 = _mm512_fmadd_ps(load16_w(w->kind, row, i), _mm512_loadu_ps(xp->x + i), d0);
            i += 16;
        }
        float dt = 0.0f;
        for (; i < n; i++) {
            float v = w->kind == K_F32 ? ((const float *)row)[i]
                    : w->kind == K_F16 ? f16_to_f32(((const uint16_t *)row)[i]) : bf16_to_f32(((const uint16_t *)row)[i]);
            dt += v * xp->x[i];
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(d0, d1)) + dt;
    }
}

static void rows_avx512(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (xp->T == 1) {
        switch (w->kind) {
        case K_INT4: case K_NF4:
            if (w->g % 32 == 0) { rows1_nibbles(w, xp, r0, r1, y); return; }
            break;
        case K_INT8: rows1_int8(w, xp, r0, r1, y); return;
        case K_F32: case K_BF16: case K_F16: rows1_float(w, xp, r0, r1, y); return;
        default: break;
        }
    }
    rows_generic_avx512(w, xp, r0, r1, y, ldy);
}

const IsaKernels kern_avx512 = {"avx512", rows_avx512, dequant_generic_avx512};
#endif
