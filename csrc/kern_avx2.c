/* AVX2 + FMA kernels (x86-64 CPUs from ~2013 on). Same structure as kern_avx512.c with 8-wide
 * vectors: a 16-byte nibble block is two 8-byte halves (codes 0..15 and 16..31 of the block). */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#define KSUFFIX avx2
#include "kern_generic.h"

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void rows1_int4(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    const __m256i m4 = _mm256_set1_epi32(15);
    const int64_t g = w->g, full = g / 32 * 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        __m256 acc = _mm256_setzero_ps();
        float sacc = 0.0f;
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const uint8_t *p = row + gi * g / 2;
            const int zi = w->zeros[r * w->ng + gi];
            const __m256i zv = _mm256_set1_epi32(zi);
            const float *xg = xp->x + gi * g;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k < full; k += 32) {
                __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k / 2)));
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k / 2 + 8)));
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(a, m4), zv)), _mm256_loadu_ps(xg + k), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, m4), zv)), _mm256_loadu_ps(xg + k + 8), d1);
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(a, 4), zv)), _mm256_loadu_ps(xg + k + 16), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), zv)), _mm256_loadu_ps(xg + k + 24), d1);
            }
            float dt = 0.0f;
            for (; k < g; k += 2) dt += (float)((p[k / 2] & 15) - zi) * xg[k] + (float)((p[k / 2] >> 4) - zi) * xg[k + 1];
            const float s = load_scale(w, r, gi);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(d0, d1), acc);
            sacc += s * dt;
        }
        y[r] = hsum256(acc) + sacc;
    }
}

static void rows1_int8(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = (const int8_t *)(w->codes + r * w->stride);
        __m256 acc = _mm256_setzero_ps();
        float sacc = 0.0f;
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const int64_t i0 = gi * w->g, gw = group_width_avx2(w, gi);
            const int8_t *p = row + i0;
            const float *xg = xp->x + i0;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= gw; k += 16) {
                __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + k))));
                __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + k + 8))));
                d0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(xg + k), d0);
                d1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(xg + k + 8), d1);
            }
            float dt = 0.0f;
            for (; k < gw; k++) dt += (float)p[k] * xg[k];
            const float s = load_scale(w, r, gi);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(d0, d1), acc);
            sacc += s * dt;
        }
        y[r] = hsum256(acc) + sacc;
    }
}

static inline __m256 load8_w(int kind, const uint8_t *row, int64_t i) {
    if (kind == K_F32) return _mm256_loadu_ps((const float *)row + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (kind == K_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static void rows1_float(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y) {
    const int64_t n = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            d0 = _mm256_fmadd_ps(load8_w(w->kind, row, i), _mm256_loadu_ps(xp->x + i), d0);
            d1 = _mm256_fmadd_ps(load8_w(w->kind, row, i + 8), _mm256_loadu_ps(xp->x + i + 8), d1);
        }
        float dt = 0.0f;
        for (; i < n; i++) {
            float v = w->kind == K_F32 ? ((const float *)row)[i]
                    : w->kind == K_F16 ? f16_to_f32(((const uint16_t *)row)[i]) : bf16_to_f32(((const uint16_t *)row)[i]);
            dt += v * xp->x[i];
        }
        y[r] = hsum256(_mm256_add_ps(d0, d1)) + dt;
    }
}

static void rows_avx2(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (xp->T == 1) {
        switch (w->kind) {
        case K_INT4: rows1_int4(w, xp, r0, r1, y); return;
        case K_INT8: rows1_int8(w, xp, r0, r1, y); return;
        case K_F32: case K_BF16: case K_F16: rows1_float(w, xp, r0, r1, y); return;
        default: break;
        }
    }
    rows_generic_avx2(w, xp, r0, r1, y, ldy);
}

const IsaKernels kern_avx2 = {"avx2", rows_avx2, dequant_generic_avx2};
#endif
