/* moe_local.formats._cpu: fused dequantize-and-multiply kernels for packed weights on the CPU.
 *
 * Plain CPython API (no torch headers: builds in seconds with any C compiler). Python hands over
 * tensor data pointers and sizes (moe_local/formats/kernels_cpu.py checks dtypes, contiguity and
 * shapes); everything here runs without the GIL on the pool of pool.c. Entry points:
 *
 *   linear(desc, x, T, y)           y[T, rows] = x[T, cols] @ W.T   (x, y float32)
 *   dequant(desc, r0, r1, out)      out[r1 - r0, cols] = W[r0:r1] as float32
 *   moe(out, x, T, ids, wts, k, table, table_ids, n_table, act)
 *                                    out[T, H] += sum over routed (token, expert) in ascending
 *                                    expert order of w * down(act(gate x) * up x)
 *   set_threads(n), threads(), isa(), set_isa(name), isas()
 *
 * desc: address of DESC_N int64 (kind, rows, cols, g, codes, row stride, scales, scale dtype,
 * zeros, 0). table: [n_table][3][DESC_N] (gate, up, down).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kern.h"
#include "pool.h"

static const IsaKernels *ISA = &kern_portable;

static int isa_supported(const char *name) {
    if (!strcmp(name, "portable")) return 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(name, "avx2")) return avx2;
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (!strcmp(name, "avx512")) return avx512;
#endif
    return 0;
}

static const IsaKernels *isa_by_name(const char *name) {
    if (!isa_supported(name)) return NULL;
#if defined(__x86_64__)
    if (!strcmp(name, "avx512")) return &kern_avx512;
    if (!strcmp(name, "avx2")) return &kern_avx2;
#endif
    return &kern_portable;
}

/* ------------------------------------------------------------------ descriptors and x preparation */

static void desc_from(const int64_t *d, WDesc *w) {
    w->kind = (int)d[0];
    w->rows = d[1];
    w->cols = d[2];
    w->g = d[3];
    w->codes = (const uint8_t *)(intptr_t)d[4];
    w->stride = d[5];
    w->scales = (const void *)(intptr_t)d[6];
    w->sdt = (int)d[7];
    w->zeros = (const uint8_t *)(intptr_t)d[8];
    w->ng = (w->cols + w->g - 1) / w->g;
}

static int64_t xlen(const WDesc *w) {
    return (w->kind <= K_F16) ? w->cols : w->ng * w->g;
}

/* floats of scratch prep_x needs */
static int64_t prep_size(const IsaKernels *isa, const WDesc *w, int T) {
    (void)isa;
    return T * (xlen(w) + w->ng) + 16;
}

/* Lay T rows of x (row t at src + idx[t] * ld, idx NULL: t) out the way w's kernels read them,
 * in `buf` (prep_size floats). */
static void prep_x(const IsaKernels *isa, const WDesc *w, int T, const float *src, int64_t ld, const int64_t *idx,
                   float *buf, XPrep *xp) {
    const int64_t len = xlen(w), cols = w->cols, g = w->g;
    const int nib = w->kind == K_INT4 || w->kind == K_NF4;
    for (int t = 0; t < T; t++) {
        const float *x = src + (idx ? idx[t] : t) * ld;
        float *d = buf + t * len;
        if (!nib) {
            memcpy(d, x, cols * sizeof(float));
            for (int64_t i = cols; i < len; i++) d[i] = 0.0f;
        } else {
            for (int64_t gi = 0; gi < w->ng; gi++) {
                const int64_t base = gi * g, full = g / 32 * 32;
                int64_t k = 0;
                if (base + full <= cols)  /* inside the row: no bounds to check */
                    for (; k < full; k += 32)
                        for (int j = 0; j < 16; j++) {
                            d[base + k + j] = x[base + k + 2 * j];
                            d[base + k + 16 + j] = x[base + k + 2 * j + 1];
                        }
                for (; k < full; k += 32)
                    for (int j = 0; j < 16; j++) {
                        const int64_t e = base + k + 2 * j, o = e + 1;
                        d[base + k + j] = e < cols ? x[e] : 0.0f;
                        d[base + k + 16 + j] = o < cols ? x[o] : 0.0f;
                    }
                for (; k < g; k++) d[base + k] = base + k < cols ? x[base + k] : 0.0f;
            }
        }
        if (w->kind == K_INT4) {
            float *xs = buf + T * len + t * w->ng;
            for (int64_t gi = 0; gi < w->ng; gi++) {
                float s = 0.0f;
                for (int64_t k = 0; k < g; k++) s += d[gi * g + k];
                xs[gi] = s;
            }
        }
    }
    xp->xs = buf + T * len;
    xp->T = T;
    xp->len = len;
    xp->ng = w->ng;
    xp->x = buf;
}

/* ------------------------------------------------------------------ linear / dequant */

typedef struct { const IsaKernels *isa; const WDesc *w; const XPrep *xp; float *y; } LinCtx;

static void lin_task(void *c, int64_t b, int64_t e) {
    LinCtx *l = (LinCtx *)c;
    l->isa->rows(l->w, l->xp, b, e, l->y, l->w->rows);
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    long long dp, xp_, yp;
    int T;
    if (!PyArg_ParseTuple(args, "LLiL", &dp, &xp_, &T, &yp)) return NULL;
    if (T < 1) { PyErr_Format(PyExc_ValueError, "linear: batch %d < 1", T); return NULL; }
    WDesc w;
    desc_from((const int64_t *)(intptr_t)dp, &w);
    const IsaKernels *isa = ISA;
    float *buf = malloc(sizeof(float) * prep_size(isa, &w, T));
    if (!buf) return PyErr_NoMemory();
    XPrep x;
    LinCtx c = {isa, &w, &x, (float *)(intptr_t)yp};
    Py_BEGIN_ALLOW_THREADS
    prep_x(isa, &w, T, (const float *)(intptr_t)xp_, w.cols, NULL, buf, &x);
    pool_run(lin_task, &c, w.rows, 8, 1);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

typedef struct { const IsaKernels *isa; const WDesc *w; int64_t r0; float *out; } DqCtx;

static void dq_task(void *c, int64_t b, int64_t e) {
    DqCtx *d = (DqCtx *)c;
    d->isa->dequant(d->w, d->r0 + b, d->r0 + e, d->out + b * d->w->cols);
}

static PyObject *py_dequant(PyObject *self, PyObject *args) {
    long long dp, r0, r1, op;
    if (!PyArg_ParseTuple(args, "LLLL", &dp, &r0, &r1, &op)) return NULL;
    WDesc w;
    desc_from((const int64_t *)(intptr_t)dp, &w);
    if (r0 < 0 || r1 > w.rows || r0 > r1) { PyErr_SetString(PyExc_ValueError, "dequant: bad row range"); return NULL; }
    DqCtx c = {ISA, &w, r0, (float *)(intptr_t)op};
    Py_BEGIN_ALLOW_THREADS
    pool_run(dq_task, &c, r1 - r0, 4, 1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ the grouped MoE layer */

enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3 };

static inline float act_fn(int act, float v) {
    switch (act) {
    case ACT_RELU: return v > 0.0f ? v : 0.0f;
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default: return v / (1.0f + expf(-v));
    }
}

typedef struct {
    WDesc gate, up, down;
    int T;               /* tokens routed to this expert */
    int64_t tok[MAX_T];
    float wt[MAX_T];
    XPrep xg, xu, xd;
    int shared_in;       /* gate and up share one prepared x */
    float *bg, *bu, *bd; /* scratch of the prepared x of gate, up, down */
    float *g, *u, *y;    /* [T][I], [T][I] (then act(g)*u in g), [T][H] */
    int64_t start1, start2;  /* first item of this expert in the gate/up and the down job */
} MoeExpert;

typedef struct {
    const IsaKernels *isa;
    MoeExpert *ex;
    int n;
    int act;
    const float *x;  /* [T][H] the layer's input */
    int64_t H;
    float *out;      /* [T][H] += the weighted expert outputs */
} MoeCtx;

/* gate and up read x prepared the same way (the usual case: one scheme for both) */
static int same_layout(const WDesc *a, const WDesc *b) {
    return a->kind == b->kind && a->g == b->g && a->cols == b->cols;
}

static void prep_in_task(void *c, int64_t b, int64_t e) {
    MoeCtx *m = (MoeCtx *)c;
    for (int64_t i = b; i < e; i++) {
        MoeExpert *x = &m->ex[i];
        prep_x(m->isa, &x->gate, x->T, m->x, m->H, x->tok, x->bg, &x->xg);
        if (x->shared_in) x->xu = x->xg;
        else prep_x(m->isa, &x->up, x->T, m->x, m->H, x->tok, x->bu, &x->xu);
    }
}

static void prep_down_task(void *c, int64_t b, int64_t e) {
    MoeCtx *m = (MoeCtx *)c;
    for (int64_t i = b; i < e; i++) {
        MoeExpert *x = &m->ex[i];
        prep_x(m->isa, &x->down, x->T, x->g, x->gate.rows, NULL, x->bd, &x->xd);
    }
}

/* out[:, h0:h1] += the experts' weighted outputs, in ascending expert order for every element:
 * the one summation order, whatever the split of columns across threads. */
static void sum_task(void *c, int64_t h0, int64_t h1) {
    MoeCtx *m = (MoeCtx *)c;
    for (int i = 0; i < m->n; i++) {
        const MoeExpert *e = &m->ex[i];
        for (int t = 0; t < e->T; t++) {
            float *o = m->out + e->tok[t] * m->H;
            const float *y = e->y + t * m->H, w = e->wt[t];
            for (int64_t h = h0; h < h1; h++) o[h] += w * y[h];
        }
    }
}

typedef struct { int64_t key, row, tok; float w; } Pair;  /* one routed (expert, token) */

static int pair_cmp(const void *a, const void *b) {
    const Pair *p = (const Pair *)a, *q = (const Pair *)b;
    if (p->key != q->key) return p->key < q->key ? -1 : 1;
    return p->tok < q->tok ? -1 : p->tok > q->tok;
}

static int first_expert(const MoeCtx *m, int64_t item, int down) {
    int lo = 0, hi = m->n - 1;  /* last expert whose start <= item */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if ((down ? m->ex[mid].start2 : m->ex[mid].start1) <= item) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The rows [r0, r1) of one expert's `rows`-row matrix, which starts at item `start` of the layer's
 * work, that fall inside the pool's chunk [b, e); 0 when none do. */
static int own_rows(int64_t b, int64_t e, int64_t start, int64_t rows, int64_t *r0, int64_t *r1) {
    *r0 = b - start < 0 ? 0 : b - start;
    *r1 = e - start > rows ? rows : e - start;
    return *r0 < *r1;
}

static void gate_up_task(void *c, int64_t b, int64_t e) {
    MoeCtx *m = (MoeCtx *)c;
    for (int i = first_expert(m, b, 0); i < m->n && m->ex[i].start1 < e; i++) {
        MoeExpert *x = &m->ex[i];
        const int64_t I = x->gate.rows;
        int64_t r0, r1;
        if (!own_rows(b, e, x->start1, I, &r0, &r1)) continue;
        m->isa->rows(&x->gate, &x->xg, r0, r1, x->g, I);
        m->isa->rows(&x->up, &x->xu, r0, r1, x->u, I);
        for (int t = 0; t < x->T; t++)
            for (int64_t r = r0; r < r1; r++) x->g[t * I + r] = act_fn(m->act, x->g[t * I + r]) * x->u[t * I + r];
    }
}

static void down_task(void *c, int64_t b, int64_t e) {
    MoeCtx *m = (MoeCtx *)c;
    for (int i = first_expert(m, b, 1); i < m->n && m->ex[i].start2 < e; i++) {
        MoeExpert *x = &m->ex[i];
        const int64_t H = x->down.rows;
        int64_t r0, r1;
        if (!own_rows(b, e, x->start2, H, &r0, &r1)) continue;
        m->isa->rows(&x->down, &x->xd, r0, r1, x->y, H);
    }
}

static PyObject *py_moe(PyObject *self, PyObject *args) {
    long long outp, xp_, idsp, wtsp, tabp, tidp;
    int T, k, n_table, act;
    if (!PyArg_ParseTuple(args, "LLiLLiLLii", &outp, &xp_, &T, &idsp, &wtsp, &k, &tabp, &tidp, &n_table, &act))
        return NULL;
    if (T < 1 || k < 1) { PyErr_Format(PyExc_ValueError, "moe: batch %d, top-k %d", T, k); return NULL; }
    const int64_t *ids = (const int64_t *)(intptr_t)idsp;
    const float *wts = (const float *)(intptr_t)wtsp;
    const int64_t *table = (const int64_t *)(intptr_t)tabp;
    const int64_t *tids = (const int64_t *)(intptr_t)tidp;
    float *out = (float *)(intptr_t)outp;
    const float *x = (const float *)(intptr_t)xp_;

    /* (table row, token, weight) of every routed pair whose expert is in the table, sorted by
     * (expert, token): the order the outputs are summed in, whatever the table holds. */
    const int64_t np_all = (int64_t)T * k;
    Pair *pr = malloc(sizeof(Pair) * (np_all > 0 ? np_all : 1));
    if (!pr) return PyErr_NoMemory();
    int64_t np = 0;
    for (int64_t i = 0; i < np_all; i++) {
        int64_t e = ids[i], row = -1;
        if (!tids) row = (e >= 0 && e < n_table) ? e : -1;
        else {
            int lo = 0, hi = n_table - 1;
            while (lo <= hi) {
                int mid = (lo + hi) / 2;
                if (tids[mid] == e) { row = mid; break; }
                if (tids[mid] < e) lo = mid + 1; else hi = mid - 1;
            }
        }
        if (row < 0) continue;
        pr[np].key = tids ? tids[row] : row;
        pr[np].row = row;
        pr[np].tok = i / k;
        pr[np].w = wts[i];
        np++;
    }
    qsort(pr, (size_t)np, sizeof(Pair), pair_cmp);
    /* one work item per expert and block of up to MAX_T of its tokens (a token's result does not
     * depend on its block: the kernels compute each (row, token) the same way for any batch) */
    MoeExpert *ex = calloc(np > 0 ? np : 1, sizeof(MoeExpert));
    if (!ex) { free(pr); return PyErr_NoMemory(); }
    int n = 0;
    for (int64_t i = 0; i < np; i++) {
        if (n == 0 || pr[i].row != pr[i - 1].row || ex[n - 1].T == MAX_T) {
            const int64_t *d = table + pr[i].row * 3 * DESC_N;
            desc_from(d, &ex[n].gate);
            desc_from(d + DESC_N, &ex[n].up);
            desc_from(d + 2 * DESC_N, &ex[n].down);
            n++;
        }
        MoeExpert *e = &ex[n - 1];
        e->tok[e->T] = pr[i].tok;
        e->wt[e->T] = pr[i].w;
        e->T++;
    }
    free(pr);
    if (n == 0) { free(ex); Py_RETURN_NONE; }
    const int64_t H = ex[0].down.rows;
    /* one scratch block: prepared x for gate/up/down, g, u, y of every expert */
    /* one scratch block: prepared x for gate/up (one, when their layouts match) and down, g, u, y */
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        MoeExpert *e = &ex[i];
        const int64_t I = e->gate.rows;
        e->shared_in = same_layout(&e->gate, &e->up);
        total += prep_size(ISA, &e->gate, e->T) + (e->shared_in ? 0 : prep_size(ISA, &e->up, e->T)) +
                 prep_size(ISA, &e->down, e->T) + e->T * (2 * I + H) + 64;
    }
    float *scratch = malloc(sizeof(float) * total);
    if (!scratch) { free(ex); return PyErr_NoMemory(); }
    MoeCtx m = {ISA, ex, n, act, x, H, out};
    Py_BEGIN_ALLOW_THREADS
    float *p = scratch;
    int64_t items1 = 0, items2 = 0;
    for (int i = 0; i < n; i++) {
        MoeExpert *e = &ex[i];
        const int64_t I = e->gate.rows;
        e->bg = p; p += prep_size(m.isa, &e->gate, e->T);
        e->bu = e->shared_in ? e->bg : p; p += e->shared_in ? 0 : prep_size(m.isa, &e->up, e->T);
        e->bd = p; p += prep_size(m.isa, &e->down, e->T);
        e->g = p; p += e->T * I;
        e->u = p; p += e->T * I;
        e->y = p; p += e->T * H;
        e->start1 = items1; items1 += I;
        e->start2 = items2; items2 += H;
    }
    /* a prompt chunk prepares x on every thread; a decode step's few experts inline (a pool job
     * costs more than their preparation) */
    const int spread = np >= 32;
    if (spread) pool_run(prep_in_task, &m, n, 1, 1); else prep_in_task(&m, 0, n);
    pool_run(gate_up_task, &m, items1, 16, 1);
    if (spread) pool_run(prep_down_task, &m, n, 1, 1); else prep_down_task(&m, 0, n);
    pool_run(down_task, &m, items2, 16, 1);
    if (spread) pool_run(sum_task, &m, H, 64, 16); else sum_task(&m, 0, H);
    Py_END_ALLOW_THREADS
    free(scratch);
    free(ex);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ settings */

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) { PyErr_SetString(PyExc_ValueError, "threads must be >= 1"); return NULL; }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pool_set_threads(n);
    Py_END_ALLOW_THREADS
    if (rc != 0) { PyErr_SetString(PyExc_OSError, "could not start the kernel threads"); return NULL; }
    Py_RETURN_NONE;
}

static PyObject *py_threads(PyObject *self, PyObject *args) { return PyLong_FromLong(pool_threads()); }
static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(ISA->name); }

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const IsaKernels *k = isa_by_name(name);
    if (!k) { PyErr_Format(PyExc_ValueError, "%s", name); return NULL; }
    ISA = k;
    Py_RETURN_NONE;
}

static PyObject *py_isas(PyObject *self, PyObject *args) {
    const char *all[] = {"portable", "avx2", "avx512"};
    PyObject *l = PyList_New(0);
    for (int i = 0; i < 3; i++)
        if (isa_supported(all[i])) {
            PyObject *s = PyUnicode_FromString(all[i]);
            PyList_Append(l, s);
            Py_DECREF(s);
        }
    return l;
}

static PyMethodDef METHODS[] = {
    {"linear", py_linear, METH_VARARGS, "linear(desc, x, T, y): y[T, rows] = x[T, cols] @ W.T (float32)"},
    {"dequant", py_dequant, METH_VARARGS, "dequant(desc, r0, r1, out): W[r0:r1] as float32"},
    {"moe", py_moe, METH_VARARGS, "moe(out, x, T, ids, wts, k, table, table_ids, n_table, act): one MoE layer"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): size of the kernel thread pool"},
    {"threads", py_threads, METH_NOARGS, "threads(): size of the kernel thread pool"},
    {"isa", py_isa, METH_NOARGS, "isa(): the kernel path in use"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): force a kernel path (portable, avx2, avx512)"},
    {"isas", py_isas, METH_NOARGS, "isas(): the kernel paths this CPU runs"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_cpu", "moe-local CPU kernels", -1, METHODS};

PyMODINIT_FUNC PyInit__cpu(void) {
    moe_local_init_tables();
    const char *best[] = {"avx512", "avx2", "portable"};
    for (int i = 0; i < 3; i++) {
        const IsaKernels *k = isa_by_name(best[i]);
        if (k) { ISA = k; break; }
    }
    PyObject *m = PyModule_Create(&MODULE);
    if (m) {
        PyModule_AddIntConstant(m, "DESC_N", DESC_N);
        PyModule_AddIntConstant(m, "MAX_T", MAX_T);
    }
    return m;
}
