/* A small persistent thread pool for row-parallel work (see pool.c). */
#ifndef MOE_LOCAL_POOL_H
#define MOE_LOCAL_POOL_H
#include <stdint.h>

typedef void (*task_fn)(void *ctx, int64_t begin, int64_t end);

int pool_set_threads(int n);     /* 0 on success */
int pool_threads(void);
/* Run fn over [0, items) split into at most `threads` contiguous ranges (boundaries multiples of
 * `align`, ranges of at least `grain` items); returns when all are done. The split never changes
 * what one item computes, so results do not depend on the thread count. */
void pool_run(task_fn fn, void *ctx, int64_t items, int64_t grain, int64_t align);
#endif
