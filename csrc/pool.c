/* Persistent workers that claim chunks of a job; the caller works too.
 *
 * Decode calls the pool a few hundred times per token with ~10-100 us of work each, on a machine
 * that may be shared: a job is cut into chunks (more chunks than threads) that the caller and
 * whichever workers are awake claim one at a time from an atomic counter. A worker the OS has not
 * scheduled simply claims nothing, so the caller never waits for a sleeping or preempted thread,
 * only for chunks already being computed. Workers spin briefly after a job (waking a sleeping
 * thread costs about as much as the job), then sleep on a condition variable.
 *
 * Which thread computes a chunk never changes what it computes: results do not depend on the
 * thread count or on scheduling. One job runs at a time; a caller that finds the pool busy
 * (another Python thread in a kernel) runs its job alone.
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
#define SPIN_ROUNDS 4000
#define CHUNKS_PER_THREAD 4

static struct {
    int n;
    pthread_t th[MAX_THREADS];
    _Atomic uint64_t claim;  /* job generation << 32 | next chunk */
    atomic_uint gen;         /* generation of the last published job */
    atomic_int done;         /* chunks of the current job finished */
    atomic_int sleeping;
    atomic_int stop;
    unsigned start_gen;
    task_fn fn;
    void *ctx;
    int64_t items, chunk;
    uint32_t nchunks;
    pthread_mutex_t m;
    pthread_cond_t cv;
    pthread_mutex_t busy;
} P = {.n = 1, .m = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER};

/* Claim and run chunks of job `g` until none is left (or a newer job replaced it). */
static void run_chunks(unsigned g) {
    for (;;) {
        uint64_t c = atomic_load(&P.claim);
        if ((unsigned)(c >> 32) != g || (uint32_t)c >= P.nchunks) return;
        if (!atomic_compare_exchange_weak(&P.claim, &c, c + 1)) continue;
        const int64_t b = (int64_t)(uint32_t)c * P.chunk;
        const int64_t e = b + P.chunk < P.items ? b + P.chunk : P.items;
        P.fn(P.ctx, b, e);
        atomic_fetch_add(&P.done, 1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    unsigned seen = P.start_gen;  /* the generation at creation: a job published since is not missed */
    for (;;) {
        unsigned now;
        int spins = 0;
        while ((now = atomic_load(&P.gen)) == seen && !atomic_load(&P.stop)) {
            if (++spins < SPIN_ROUNDS) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&P.m);
            atomic_fetch_add(&P.sleeping, 1);
            while (atomic_load(&P.gen) == seen && !atomic_load(&P.stop)) pthread_cond_wait(&P.cv, &P.m);
            atomic_fetch_sub(&P.sleeping, 1);
            pthread_mutex_unlock(&P.m);
            spins = 0;
        }
        if (atomic_load(&P.stop)) return NULL;
        seen = now;
        run_chunks(seen);
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
        if (pthread_create(&P.th[i], NULL, worker, NULL) != 0) { ok = 0; n = i; break; }
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
    if (P.n <= 1 || items <= grain || pthread_mutex_trylock(&P.busy) != 0) {
        fn(ctx, 0, items);
        return;
    }
    int64_t chunk = (items + (int64_t)P.n * CHUNKS_PER_THREAD - 1) / ((int64_t)P.n * CHUNKS_PER_THREAD);
    if (chunk < grain) chunk = grain;
    chunk = (chunk + align - 1) / align * align;
    const unsigned g = atomic_load(&P.gen) + 1;
    /* Close the claim counter before touching the job's fields: a worker still looping over the
     * last job reads P.nchunks without a lock, and could otherwise see this job's (larger) count,
     * claim a chunk through the old counter, and finish it into `done` after it was reset, letting
     * this job return while a chunk is still being written. With the counter changed first, such a
     * claim fails its compare-and-swap. */
    atomic_store(&P.claim, ((uint64_t)g << 32) | UINT32_MAX);
    P.fn = fn;
    P.ctx = ctx;
    P.items = items;
    P.chunk = chunk;
    P.nchunks = (uint32_t)((items + chunk - 1) / chunk);
    atomic_store(&P.done, 0);
    atomic_store(&P.claim, (uint64_t)g << 32);
    atomic_store(&P.gen, g);
    if (atomic_load(&P.sleeping) > 0) {
        pthread_mutex_lock(&P.m);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.m);
    }
    run_chunks(g);
    int spins = 0;
    while (atomic_load(&P.done) < (int)P.nchunks) {  /* only chunks other threads are computing */
        if (++spins < SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();
    }
    pthread_mutex_unlock(&P.busy);
}
