/* The portable kernels (any CPU, any arch) and the shared lookup tables. */
#define KSUFFIX portable
#include "kern_generic.h"

const float NF4_LUT[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* byte -> its five base-3 digits minus one (bits.py: least significant first). Filled at import. */
int8_t TRIT_LUT[256][5];

void moe_local_init_tables(void) {
    for (int b = 0; b < 256; b++) {
        int v = b;
        for (int i = 0; i < 5; i++) { TRIT_LUT[b][i] = (int8_t)(v % 3 - 1); v /= 3; }
    }
}

const IsaKernels kern_portable = {"portable", rows_generic_portable, dequant_generic_portable};
