/* The generic kernels: plain C, written so a compiler can vectorise the inner loops (16 partial
 * sums in a fixed order, no reassociation needed). Included once per ISA file with KSUFFIX set, so
 * each file compiles its own copy under its own `#pragma GCC target`: the portable path on any
 * CPU, and the fallback for kinds/batches the hand-written kernels of an ISA do not cover.
 */
#include "kern.h"

#define KCAT2(a, b) a##_##b
#define KCAT(a, b) KCAT2(a, b)
#define FN(n) KCAT(n, KSUFFIX)

static inline float FN(dot)(const float *q, const float *x, int64_t n) {
    float p[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) p[j] += q[i + j] * x[i + j];
    for (int j = 0; i < n; i++, j++) p[j] += q[i] * x[i];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += p[j];
    return s;
}

static inline int FN(is_float)(int kind) { return kind == K_F32 || kind == K_BF16 || kind == K_F16; }

/* Codes [k0, k0 + n) of group gi of `row` as floats, in the order XPrep lays x out (nibble kinds:
 * each full 32-block as 16 low nibbles then 16 high nibbles; int4 minus its zero point z, exact).
 * k0 is a multiple of SUB. */
static void FN(decode)(const WDesc *w, const uint8_t *row, int64_t gi, int64_t k0, int64_t n, int z, float *q) {
    switch (w->kind) {
    case K_F32: { const float *p = (const float *)row + k0; for (int64_t i = 0; i < n; i++) q[i] = p[i]; break; }
    case K_BF16: { const uint16_t *p = (const uint16_t *)row + k0; for (int64_t i = 0; i < n; i++) q[i] = bf16_to_f32(p[i]); break; }
    case K_F16: { const uint16_t *p = (const uint16_t *)row + k0; for (int64_t i = 0; i < n; i++) q[i] = f16_to_f32(p[i]); break; }
    case K_INT8: { const int8_t *p = (const int8_t *)row + gi * w->g + k0; for (int64_t i = 0; i < n; i++) q[i] = (float)p[i]; break; }
    case K_INT4:
    case K_NF4: {
        const uint8_t *p = row + (gi * w->g + k0) / 2;
        const int nf = w->kind == K_NF4;
        int64_t full = (w->g / 32) * 32 - k0;  /* codes of this sub-block inside full 32-blocks */
        if (full > n) full = n;
        int64_t k = 0;
        for (; k < full; k += 32, p += 16)
            for (int j = 0; j < 16; j++) {
                int lo = p[j] & 15, hi = p[j] >> 4;
                q[k + j] = nf ? NF4_LUT[lo] : (float)(lo - z);
                q[k + 16 + j] = nf ? NF4_LUT[hi] : (float)(hi - z);
            }
        for (; k < n; k += 2, p++) {
            int lo = p[0] & 15, hi = p[0] >> 4;
            q[k] = nf ? NF4_LUT[lo] : (float)(lo - z);
            q[k + 1] = nf ? NF4_LUT[hi] : (float)(hi - z);
        }
        break;
    }
    case K_TERNARY: {
        int64_t e = gi * w->g + k0;
        for (int64_t i = 0; i < n; i++, e++) q[i] = (float)TRIT_LUT[row[e / 5]][e % 5];
        break;
    }
    }
}

/* Codes a group holds: int8 stores exactly `cols` codes per row; the packed kinds store whole
 * (zero-padded) groups, float kinds one group of the row. */
static inline int64_t FN(group_width)(const WDesc *w, int64_t gi) {
    if (w->kind == K_INT8) {
        int64_t left = w->cols - gi * w->g;
        return left < w->g ? left : w->g;
    }
    return w->g;
}

static void FN(rows_generic)(const WDesc *w, const XPrep *xp, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    float q[SUB];
    const int T = xp->T;
    const int fl = FN(is_float)(w->kind);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        float acc[MAX_T];
        for (int t = 0; t < T; t++) acc[t] = 0.0f;
        for (int64_t gi = 0; gi < w->ng; gi++) {
            const int64_t gw = FN(group_width)(w, gi);
            float part[MAX_T];
            for (int t = 0; t < T; t++) part[t] = 0.0f;
            for (int64_t k0 = 0; k0 < gw; k0 += SUB) {
                const int64_t n = gw - k0 < SUB ? gw - k0 : SUB;
                FN(decode)(w, row, gi, k0, n, w->kind == K_INT4 ? w->zeros[r * w->ng + gi] : 0, q);
                for (int t = 0; t < T; t++) part[t] += FN(dot)(q, xp->x + t * xp->len + gi * w->g + k0, n);
            }
            const float s = fl ? 1.0f : load_scale(w, r, gi);
            for (int t = 0; t < T; t++) acc[t] += s * part[t];
        }
        for (int t = 0; t < T; t++) y[t * ldy + r] = acc[t];
    }
}

/* W[r0:r1] as float32 rows, natural order: the same arithmetic as the Python reference
 * (code - zero) * scale, so the GEMM path multiplies exactly the reference matrix. */
static void FN(dequant_generic)(const WDesc *w, int64_t r0, int64_t r1, float *out) {
    const int64_t cols = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + r * w->stride;
        float *o = out + (r - r0) * cols;
        switch (w->kind) {
        case K_F32: for (int64_t i = 0; i < cols; i++) o[i] = ((const float *)row)[i]; break;
        case K_BF16: for (int64_t i = 0; i < cols; i++) o[i] = bf16_to_f32(((const uint16_t *)row)[i]); break;
        case K_F16: for (int64_t i = 0; i < cols; i++) o[i] = f16_to_f32(((const uint16_t *)row)[i]); break;
        default:
            for (int64_t gi = 0; gi < w->ng; gi++) {
                const float s = load_scale(w, r, gi);
                const int64_t i0 = gi * w->g, i1 = i0 + w->g < cols ? i0 + w->g : cols;
                if (w->kind == K_INT8) {
                    for (int64_t i = i0; i < i1; i++) o[i] = (float)((const int8_t *)row)[i] * s;
                } else if (w->kind == K_INT4) {
                    const float z = (float)w->zeros[r * w->ng + gi];
                    for (int64_t i = i0; i < i1; i++) o[i] = ((float)((row[i >> 1] >> ((i & 1) * 4)) & 15) - z) * s;
                } else if (w->kind == K_NF4) {
                    for (int64_t i = i0; i < i1; i++) o[i] = NF4_LUT[(row[i >> 1] >> ((i & 1) * 4)) & 15] * s;
                } else {
                    for (int64_t i = i0; i < i1; i++) o[i] = (float)TRIT_LUT[row[i / 5]][i % 5] * s;
                }
            }
        }
    }
}
