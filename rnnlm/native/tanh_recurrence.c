/* The chapter's recurrence h_t = tanh(h_{t-1} W_hh^T + b_hh + pre_t) and its backward pass,
 * one call per sequence instead of several framework operations per time step.
 *
 * The matrix products run in the BLAS that torch itself links (MKL on x86-64; its functions
 * are handed over once by tanh_recurrence_init), through MKL's packed-matrix interface: W_hh is
 * reorganised once per sequence instead of once per time step. The elementwise work of a step
 * is one fused pass. Every output row depends only on its own input row, so splitting the batch
 * across ranks, or across this process's threads (run_split), changes no bit, as long as every
 * run has at least MIN_ROWS rows (MKL computes runs of 1-3 rows another way).
 * Built by rnnlm/native/__init__.py (x86-64 with AVX2 and FMA, gcc's OpenMP).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* MKL's Fortran interface (column-major): sgemm_pack_get_size, sgemm_pack, sgemm_compute. */
typedef size_t (*pack_size_fn)(const char *identifier, const int *m, const int *n, const int *k);
typedef void (*pack_fn)(const char *identifier, const char *trans, const int *m, const int *n,
                        const int *k, const float *alpha, const float *src, const int *ld,
                        float *dest);
typedef void (*compute_fn)(const char *transa, const char *transb, const int *m, const int *n,
                           const int *k, const float *a, const int *lda, const float *b,
                           const int *ldb, const float *beta, float *c, const int *ldc);

/* mkl_set_num_threads_local: a worker's products must not start threads of their own. */
typedef int (*threads_local_fn)(int count);

static pack_size_fn pack_size;
static pack_fn pack;
static compute_fn compute;
static threads_local_fn set_threads_local;

void tanh_recurrence_init(pack_size_fn size_fn, pack_fn pack_fn_, compute_fn compute_fn_,
                          threads_local_fn threads_fn) {
    pack_size = size_fn;
    pack = pack_fn_;
    compute = compute_fn_;
    set_threads_local = threads_fn;
}

/* exp(x) for x in [0, 20] (tanh's range below): Cephes' expf, ~1 ulp. */
static inline __m256 exp8(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 c1 = _mm256_set1_ps(0.693359375f);
    const __m256 c2 = _mm256_set1_ps(-2.12194440e-4f);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, c1, x);
    r = _mm256_fnmadd_ps(n, c2, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

/* tanh, Cephes' tanhf scheme: an odd polynomial below 0.625, 1 - 2/(exp(2|x|) + 1) above,
 * saturating at 10 (tanh of anything above 9.02 rounds to 1 in float). Within 2 ulp. */
static inline __m256 tanh8(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_min_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(10.0f));
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    __m256 e = exp8(_mm256_add_ps(a, a));
    __m256 large = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                 _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    large = _mm256_or_ps(large, _mm256_and_ps(sign, x));
    __m256 use_small = _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
    __m256 y = _mm256_blendv_ps(large, small, use_small);
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN stays NaN */
}

/* out[i] = tanh(out[i] + bias[i % hidden] + pre[i]) over one (rows, hidden) block. */
static void bias_add_tanh(float *out, const float *pre, const float *bias, int rows, int hidden) {
    for (int r = 0; r < rows; r++) {
        float *o = out + (int64_t)r * hidden;
        const float *p = pre + (int64_t)r * hidden;
        int j = 0;
        for (; j + 8 <= hidden; j += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(o + j), _mm256_loadu_ps(bias + j));
            _mm256_storeu_ps(o + j, tanh8(_mm256_add_ps(v, _mm256_loadu_ps(p + j))));
        }
        if (j < hidden) { /* the same arithmetic on a padded vector */
            float buf[8] = {0};
            for (int i = j; i < hidden; i++) buf[i - j] = (o[i] + bias[i]) + p[i];
            _mm256_storeu_ps(buf, tanh8(_mm256_loadu_ps(buf)));
            for (int i = j; i < hidden; i++) o[i] = buf[i - j];
        }
    }
}

/* W_hh packed for products with it: op = 'T' gives x @ W_hh^T, op = 'N' gives x @ W_hh.
 * Returns NULL when out of memory. */
static float *packed_weight(const char *op, const float *w_hh, int rows, int hidden) {
    const float one = 1.0f;
    float *buf = malloc(pack_size("A", &hidden, &rows, &hidden));
    if (buf) pack("A", op, &hidden, &rows, &hidden, &one, w_hh, &hidden, buf);
    return buf;
}

/* One thread's share: rows [first, first + rows) of every (batch, hidden) time-step block.
 * Tensors are (steps[+1], batch, hidden); the pointers below already point at row `first`. */
struct rows_job {
    int steps, rows, hidden;
    int64_t block; /* batch * hidden: the distance between two time steps */
    const float *pre, *w_hh, *b_hh, *outs, *grad_out;
    float *hs, *dh, *dz, *scratch;
    int status;
};

static void forward_rows(struct rows_job *j) {
    const float zero = 0.0f;
    /* Row-major out (rows, hidden) = prev @ W_hh^T is column-major out^T = W_hh prev^T. */
    float *w = packed_weight("T", j->w_hh, j->rows, j->hidden);
    if (!w) {
        j->status = -1;
        return;
    }
    for (int t = 0; t < j->steps; t++) {
        float *out = j->hs + (t + 1) * j->block;
        compute("P", "N", &j->hidden, &j->rows, &j->hidden, w, &j->hidden, j->hs + t * j->block,
                &j->hidden, &zero, out, &j->hidden);
        bias_add_tanh(out, j->pre + t * j->block, j->b_hh, j->rows, j->hidden);
    }
    free(w);
}

static void backward_rows(struct rows_job *j) {
    const int64_t n = (int64_t)j->rows * j->hidden;
    const float zero = 0.0f;
    float *w = packed_weight("N", j->w_hh, j->rows, j->hidden); /* dh_{t-1} = dz_t @ W_hh */
    if (!w) {
        j->status = -1;
        return;
    }
    float *up = j->dh, *next = j->scratch;
    for (int t = j->steps - 1; t >= 0; t--) {
        const float *h = j->outs + t * j->block;
        const float *g = j->grad_out ? j->grad_out + t * j->block : NULL;
        float *d = j->dz + t * j->block;
        int64_t i = 0;
        /* dz_t = (g_t + dh_t) * (1 - h_t * h_t), each operation rounded as the framework's */
        for (; i + 8 <= n; i += 8) {
            __m256 hv = _mm256_loadu_ps(h + i);
            __m256 local = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(hv, hv));
            __m256 u = _mm256_loadu_ps(up + i);
            if (g) u = _mm256_add_ps(_mm256_loadu_ps(g + i), u);
            _mm256_storeu_ps(d + i, _mm256_mul_ps(u, local));
        }
        for (; i < n; i++) {
            float local = 1.0f - h[i] * h[i];
            d[i] = (g ? g[i] + up[i] : up[i]) * local;
        }
        compute("P", "N", &j->hidden, &j->rows, &j->hidden, w, &j->hidden, d, &j->hidden, &zero,
                next, &j->hidden);
        float *swap = up;
        up = next;
        next = swap;
    }
    if (up != j->dh) memcpy(j->dh, up, n * sizeof(float));
    free(w);
}

#define MAX_THREADS 64
#define MIN_ROWS 4 /* per run: MKL's packed product takes another path for 1-3 rows */

/* Split the batch into `threads` runs of whole rows, one per OpenMP thread (torch's own pool:
 * built with gcc, this library shares the libgomp torch loaded), each with single-threaded
 * products: the time steps stay sequential, the rows are independent. Results do not depend
 * on the split (each row is computed the same way in any run of MIN_ROWS rows or more). */
static int run_split(void (*work)(struct rows_job *), struct rows_job proto, int batch,
                     int threads) {
    struct rows_job jobs[MAX_THREADS];
    if (threads > batch / MIN_ROWS) threads = batch / MIN_ROWS;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int i = 0, first = 0; i < threads; i++) {
        int rows = batch / threads + (i < batch % threads);
        int64_t offset = (int64_t)first * proto.hidden;
        jobs[i] = proto;
        jobs[i].rows = rows;
        jobs[i].pre = proto.pre ? proto.pre + offset : NULL;
        jobs[i].outs = proto.outs ? proto.outs + offset : NULL;
        jobs[i].grad_out = proto.grad_out ? proto.grad_out + offset : NULL;
        jobs[i].hs = proto.hs ? proto.hs + offset : NULL;
        jobs[i].dh = proto.dh ? proto.dh + offset : NULL;
        jobs[i].dz = proto.dz ? proto.dz + offset : NULL;
        jobs[i].scratch = proto.scratch ? proto.scratch + offset : NULL;
        first += rows;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
    for (int i = 0; i < threads; i++) {
        int before = set_threads_local(1);
        work(&jobs[i]);
        set_threads_local(before);
    }
    int status = 0;
    for (int i = 0; i < threads; i++) status |= jobs[i].status;
    return status;
}

/* hs: (steps + 1, batch, hidden), hs[0] = h_0 on entry; fills hs[1..steps].
 * pre: (steps, batch, hidden); w_hh: (hidden, hidden) row-major; b_hh: (hidden).
 * Returns 0, or -1 when out of memory. */
int tanh_recurrence_forward(int steps, int batch, int hidden, const float *pre,
                            const float *w_hh, const float *b_hh, float *hs, int threads) {
    struct rows_job job = {.steps = steps, .hidden = hidden, .block = (int64_t)batch * hidden,
                           .pre = pre, .w_hh = w_hh, .b_hh = b_hh, .hs = hs};
    return run_split(forward_rows, job, batch, threads);
}

/* Backward through time. outs = hs[1..steps]; grad_out: (steps, batch, hidden) or NULL.
 * dh: (batch, hidden), dL/dh_T on entry (zeros when absent), dL/dh_0 on exit; scratch is as
 * large. dz: (steps, batch, hidden) receives dL/dpre_t, the gradient of every step's input.
 * Returns 0, or -1 when out of memory. */
int tanh_recurrence_backward(int steps, int batch, int hidden, const float *outs,
                             const float *grad_out, const float *w_hh, float *dh, float *dz,
                             float *scratch, int threads) {
    struct rows_job job = {.steps = steps, .hidden = hidden, .block = (int64_t)batch * hidden,
                           .outs = outs, .grad_out = grad_out, .w_hh = w_hh, .dh = dh,
                           .dz = dz, .scratch = scratch};
    return run_split(backward_rows, job, batch, threads);
}
