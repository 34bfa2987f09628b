/* Shared definitions of the moe-local CPU kernels (moe_local.formats._cpu).
 *
 * A weight is described by a WDesc (filled from the int64 descriptor Python builds once per weight),
 * an activation batch by an XPrep (x in float32, prepared once per call: zero-padded to whole groups,
 * nibble blocks permuted). Every ISA file provides the same two
 * entry points over a row range; rows are independent, so any split of rows across threads gives
 * bitwise identical results.
 */
#ifndef MOE_LOCAL_KERN_H
#define MOE_LOCAL_KERN_H

#include <stdint.h>
#include <stddef.h>

enum { K_F32 = 0, K_BF16 = 1, K_F16 = 2, K_INT8 = 3, K_INT4 = 4, K_NF4 = 5, K_TERNARY = 6 };
enum { S_F32 = 0, S_BF16 = 1, S_F16 = 2 };
#define DESC_N 10   /* int64 fields of one weight descriptor (see descriptor() in kernels_cpu.py) */
#define MAX_T 64    /* tokens of one expert one grouped-layer work item carries (more: several items) */
#define SUB 256     /* codes decoded at once by the generic kernels (a multiple of 32) */

typedef struct {
    int kind;
    int64_t rows, cols, g, ng;
    const uint8_t *codes;   /* row r starts at codes + r * stride (bytes) */
    int64_t stride;
    const void *scales;     /* [rows, ng] contiguous, in sdt */
    int sdt;
    const uint8_t *zeros;   /* int4: [rows, ng] uint8 */
} WDesc;

typedef struct {
    int T;
    int64_t len;            /* floats per token: ng * g (float kinds: cols) */
    int64_t ng;
    const float *x;         /* [T][len]; nibble kinds: each full 32-block of a group permuted (evens, odds) */
    const float *xs;        /* int4: [T][ng] the sum of each group of x (zero points folded out) */
} XPrep;

/* The (row, token) loops of the block kernels, fully unrolled: R and TB are compile-time constants
 * in every specialised kernel, so the per-(row, token) accumulators stay in registers. */
#define FOR_ROWS(R) _Pragma("GCC unroll 2") for (int i = 0; i < (R); i++)
#define FOR_TOKENS(TB) _Pragma("GCC unroll 8") for (int t = 0; t < (TB); t++)

typedef void (*rows_fn)(const WDesc *w, const XPrep *x, int64_t r0, int64_t r1, float *y, int64_t ldy);
typedef void (*dequant_fn)(const WDesc *w, int64_t r0, int64_t r1, float *out);

typedef struct {
    const char *name;
    rows_fn rows;        /* y[t * ldy + r] = sum_i W[r, i] * x[t, i] for r in [r0, r1) */
    dequant_fn dequant;  /* out[(r - r0) * cols + i] = W[r, i] */
} IsaKernels;

extern const IsaKernels kern_portable;
#if defined(__x86_64__)
extern const IsaKernels kern_avx2;
extern const IsaKernels kern_avx512;
#endif

extern const float NF4_LUT[16];
extern int8_t TRIT_LUT[256][5];
void moe_local_init_tables(void);

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    union { uint32_t u; float f; } v;
    v.u = bits;
    return v.f;
}

static inline float load_scale(const WDesc *w, int64_t r, int64_t gi) {
    int64_t i = r * w->ng + gi;
    switch (w->sdt) {
    case S_BF16: return bf16_to_f32(((const uint16_t *)w->scales)[i]);
    case S_F16: return f16_to_f32(((const uint16_t *)w->scales)[i]);
    default: return ((const float *)w->scales)[i];
    }
}

#endif
