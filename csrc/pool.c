/* Persistent workers that spin briefly, then sleep on a condition variable.
 *
 * Decode calls the pool a few hundred times per token with ~10-100 us of work each: waking a
 * sleeping thread costs about as much, so workers spin for a while after each job first. The
 * calling thread takes the first range itself. One job runs at a time; a caller that finds the
 * pool busy (another Python thread in a kernel) runs its job alone, which gives the same result.
 */
#include "pool.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN_ROUNDS 20000

static struct {
    int n;
    pthread_t th[MAX_THREADS];
    atomic_uint gen;
    unsigned start_gen;
    atomic_int pending;
    atomic_int stop;
    task_fn fn;
    void *ctx;
    int64_t bounds[MAX_THREADS + 1];
    int parts;
    pthread_mutex_t m;
    pthread_cond_t cv;
    pthread_mutex_t busy;
} P = {.n = 1, .m = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER};

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    /* the generation when this worker was created (not when it first runs: a job may already
     * have been published by then, and it must not be missed) */
    unsigned seen = P.start_gen;
    for (;;) {
        unsigned now;
        int spins = 0;
        while ((now = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen && !atomic_load(&P.stop)) {
            if (++spins < SPIN_ROUNDS) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&P.m);
            while (atomic_load(&P.gen) == seen && !atomic_load(&P.stop)) pthread_cond_wait(&P.cv, &P.m);
            pthread_mutex_unlock(&P.m);
        }
        if (atomic_load(&P.stop)) return NULL;
        seen = now;
        if (id < P.parts) P.fn(P.ctx, P.bounds[id], P.bounds[id + 1]);
        /* every worker acknowledges every job (not only those with a range), so none can still be
         * reading this job's parameters when the next one is published */
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
}

static void stop_workers(void) {
    if (P.n <= 1) return;
    pthread_mutex_lock(&P.m);
    atomic_store(&P.stop, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.m);
    for (int i = 1; i < P.n; i++) pthread_join(P.th[i], NULL);
    atomic_store(&P.stop, 0);
    P.n = 1;
}

int pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&P.busy);
    stop_workers();
    P.start_gen = atomic_load(&P.gen);  /* no job can start while we hold busy */
    int ok = 1;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) { ok = 0; n = i; break; }
    }
    P.n = n;
    pthread_mutex_unlock(&P.busy);
    return ok ? 0 : -1;
}

int pool_threads(void) { return P.n; }

void pool_run(task_fn fn, void *ctx, int64_t items, int64_t grain, int64_t align) {
    if (items <= 0) return;
    if (grain < 1) grain = 1;
    if (align < 1) align = 1;
    int parts = P.n;
    if ((items + grain - 1) / grain < parts) parts = (int)((items + grain - 1) / grain);
    if (parts <= 1 || pthread_mutex_trylock(&P.busy) != 0) {
        fn(ctx, 0, items);
        return;
    }
    if (parts > P.n) parts = P.n;  /* P.n cannot change while we hold busy */
    P.bounds[0] = 0;
    for (int i = 1; i < parts; i++) P.bounds[i] = (items * i / parts) / align * align;
    P.bounds[parts] = items;
    P.fn = fn;
    P.ctx = ctx;
    P.parts = parts;
    atomic_store(&P.pending, P.n - 1);
    pthread_mutex_lock(&P.m);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.m);
    fn(ctx, P.bounds[0], P.bounds[1]);
    int spins = 0;
    while (atomic_load_explicit(&P.pending, memory_order_acquire) > 0) {
        if (++spins < SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();
    }
    pthread_mutex_unlock(&P.busy);
}
