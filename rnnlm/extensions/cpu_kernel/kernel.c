/* The chapter's model (one tanh RNN layer, the output layer, the mean cross-entropy), one
 * training step forward and backward in one call (rnnlm_rnn_train_step), and d2l's gradient
 * clipping with the SGD update in one call (rnnlm_clip_sgd). ops.cpp binds both as PyTorch
 * operators; nothing here knows of PyTorch.
 *
 * The matrix products are this file's own (matmul_panels, rnnlm_matmul): the right-hand matrix
 * is reorganised once per call into panels of two vectors' width that stay in the L1 cache, and
 * a tile of up to MR rows x NR columns accumulates in registers, every output element one chain
 * of fused multiply-adds over k in order. Because each element is computed the same way
 * whatever tile its row falls in and whatever the vector width, splitting the batch across
 * ranks or across this process's threads (run_split) changes no bit, and the AVX-512 build
 * computes the AVX2 build's bits. The recurrence's elementwise work of a step is one fused pass
 * that also looks the inputs up in the first layer's table (one_hot(x) W_ih^T + b_ih is row x
 * of W_ih^T + b_ih). The backward pass keeps in its time loop only what is truly sequential,
 * dh_{t-1} = dz_t W_hh, and computes the weight gradient of W_hh as one large product after it.
 *
 * Built by build.py: x86-64 with AVX2 and FMA, or with -DRNNLM_AVX512 and AVX-512 F/DQ; gcc's
 * OpenMP, whose runtime is the one PyTorch loads (the same soname).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"

/* One vector of VL floats and the operations this file uses on it, for either instruction set.
 * Each maps to one instruction with the same IEEE rounding in both, so the results agree. */
#ifdef RNNLM_AVX512
#define VL 16
#define MR 8 /* rows per register tile: 16 accumulators + 2 panel vectors + 1 broadcast */
typedef __m512 vec;
#define v_load _mm512_loadu_ps
#define v_store _mm512_storeu_ps
#define v_set1 _mm512_set1_ps
#define v_zero _mm512_setzero_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_min _mm512_min_ps
#define v_max _mm512_max_ps
#define v_fmadd _mm512_fmadd_ps
#define v_fnmadd _mm512_fnmadd_ps
#define v_abs _mm512_abs_ps
#define v_sign_of(x) _mm512_and_ps(_mm512_set1_ps(-0.0f), (x))
#define v_or _mm512_or_ps
#define v_round_nearest(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_pow2_scale(p, n) /* p * 2^n for integral n, by adding n to the exponent bits */ \
    _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p),                         \
                                         _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23)))
#define v_less(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_LT_OQ)
#define v_is_nan(x) _mm512_cmp_ps_mask((x), (x), _CMP_UNORD_Q)
#define v_select(m, yes, no) _mm512_mask_blend_ps((m), (no), (yes))
#else
#define VL 8
#define MR 6 /* rows per register tile: 12 accumulators + 2 panel vectors + 1 broadcast */
typedef __m256 vec;
#define v_load _mm256_loadu_ps
#define v_store _mm256_storeu_ps
#define v_set1 _mm256_set1_ps
#define v_zero _mm256_setzero_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_min _mm256_min_ps
#define v_max _mm256_max_ps
#define v_fmadd _mm256_fmadd_ps
#define v_fnmadd _mm256_fnmadd_ps
#define v_abs(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), (x))
#define v_sign_of(x) _mm256_and_ps(_mm256_set1_ps(-0.0f), (x))
#define v_or _mm256_or_ps
#define v_round_nearest(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_pow2_scale(p, n)                                                               \
    _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p),                         \
                                         _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)))
#define v_less(a, b) _mm256_cmp_ps((a), (b), _CMP_LT_OQ)
#define v_is_nan(x) _mm256_cmp_ps((x), (x), _CMP_UNORD_Q)
#define v_select(m, yes, no) _mm256_blendv_ps((no), (yes), (m))
#endif
#define NR (2 * VL) /* columns per packed panel: two vectors */
#define KC (4096 / NR) /* inner-dimension block of rnnlm_matmul: a 16 KiB panel */

/* exp(x) for x in [-80, 20] (the ranges of tanh and of the softmax below): Cephes' expf,
 * ~1 ulp; NaN stays NaN. */
static inline vec v_exp(vec x) {
    vec n = v_round_nearest(v_mul(x, v_set1(1.44269504088896341f)));
    vec r = v_fnmadd(n, v_set1(0.693359375f), x);
    r = v_fnmadd(n, v_set1(-2.12194440e-4f), r);
    vec p = v_set1(1.9875691500e-4f);
    p = v_fmadd(p, r, v_set1(1.3981999507e-3f));
    p = v_fmadd(p, r, v_set1(8.3334519073e-3f));
    p = v_fmadd(p, r, v_set1(4.1665795894e-2f));
    p = v_fmadd(p, r, v_set1(1.6666665459e-1f));
    p = v_fmadd(p, r, v_set1(5.0000001201e-1f));
    p = v_fmadd(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_pow2_scale(p, n);
}

/* tanh, Cephes' tanhf scheme: an odd polynomial below 0.625, 1 - 2/(exp(2|x|) + 1) above,
 * saturating at 10 (tanh of anything above 9.02 rounds to 1 in float). Within 2 ulp. */
static inline vec v_tanh(vec x) {
    vec a = v_min(v_abs(x), v_set1(10.0f));
    vec z = v_mul(x, x);
    vec p = v_set1(-5.70498872745e-3f);
    p = v_fmadd(p, z, v_set1(2.06390887954e-2f));
    p = v_fmadd(p, z, v_set1(-5.37397155531e-2f));
    p = v_fmadd(p, z, v_set1(1.33314422036e-1f));
    p = v_fmadd(p, z, v_set1(-3.33332819422e-1f));
    vec small = v_fmadd(v_mul(p, z), x, x);
    vec e = v_exp(v_add(a, a));
    vec large = v_sub(v_set1(1.0f), v_div(v_set1(2.0f), v_add(e, v_set1(1.0f))));
    large = v_or(large, v_sign_of(x));
    vec y = v_select(v_less(a, v_set1(0.625f)), small, large);
    return v_select(v_is_nan(x), x, y); /* NaN stays NaN */
}

/* out[r] = tanh(out[r] + bias + pre row) for the rows of one (rows, hidden) block, where the
 * pre row is row ids[r] of the table `pre` when ids is given, else row r of the block `pre`. */
static void bias_add_tanh(float *out, const float *pre, const int64_t *ids, const float *bias,
                          int rows, int hidden) {
    for (int r = 0; r < rows; r++) {
        float *o = out + (int64_t)r * hidden;
        const float *p = pre + (ids ? ids[r] : r) * (int64_t)hidden;
        int j = 0;
        for (; j + VL <= hidden; j += VL) {
            vec v = v_add(v_load(o + j), v_load(bias + j));
            v_store(o + j, v_tanh(v_add(v, v_load(p + j))));
        }
        if (j < hidden) { /* the same arithmetic on a padded vector */
            float buf[VL] = {0};
            for (int i = j; i < hidden; i++) buf[i - j] = (o[i] + bias[i]) + p[i];
            v_store(buf, v_tanh(v_load(buf)));
            for (int i = j; i < hidden; i++) o[i] = buf[i - j];
        }
    }
}

/* Panel p of B (k_dim x n), B(k, j) = b[k * b_k + j * b_j] (B or a transposed matrix):
 * columns [p * NR, p * NR + NR) as k_dim rows of NR floats in dst, columns past n zero. */
static void pack_panel(const float *b, int64_t b_k, int64_t b_j, int k_dim, int n, int p,
                       float *dst) {
    if (b_j == 1 && (p + 1) * NR <= n) { /* whole rows of NR floats: copied, not gathered */
        for (int k = 0; k < k_dim; k++)
            memcpy(dst + (int64_t)k * NR, b + k * b_k + p * NR, NR * sizeof(float));
        return;
    }
    for (int k = 0; k < k_dim; k++)
        for (int c = 0; c < NR; c++) {
            int j = p * NR + c;
            dst[(int64_t)k * NR + c] = j < n ? b[k * b_k + j * b_j] : 0.0f;
        }
}

/* c[i][0 .. cols) = sum over k of a(i, k) * panel[k] for M rows of A, where a(i, k) is
 * a[i * a_row + k * a_k] (A or a transposed matrix). Every element is one chain of fused
 * multiply-adds over k = 0 .. k_dim-1 in order, from zero (or, with `resume`, from the partial
 * sum already in c), so a row's result does not depend on M: on which tile, run or rank the row
 * falls in. */
#define DEFINE_TILE(M)                                                                         \
    static void tile_##M(const float *a, int64_t a_row, int64_t a_k, const float *panel,       \
                         int k_dim, float *c, int64_t ldc, int cols, int resume) {            \
        vec lo[M], hi[M];                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) {                                 \
            if (!resume) {                                                                    \
                lo[i] = hi[i] = v_zero();                                                     \
            } else if (cols == NR) {                                                          \
                lo[i] = v_load(c + i * ldc);                                                  \
                hi[i] = v_load(c + i * ldc + VL);                                             \
            } else {                                                                          \
                float buf[NR] = {0};                                                          \
                memcpy(buf, c + i * ldc, cols * sizeof(float));                               \
                lo[i] = v_load(buf);                                                          \
                hi[i] = v_load(buf + VL);                                                     \
            }                                                                                 \
        }                                                                                     \
        for (int k = 0; k < k_dim; k++) {                                                     \
            vec b0 = v_load(panel + (int64_t)k * NR);                                         \
            vec b1 = v_load(panel + (int64_t)k * NR + VL);                                    \
            const float *ak = a + k * a_k;                                                    \
            _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) {                             \
                vec av = v_set1(ak[i * a_row]);                                               \
                lo[i] = v_fmadd(av, b0, lo[i]);                                               \
                hi[i] = v_fmadd(av, b1, hi[i]);                                               \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) {                                 \
            float *row = c + i * ldc;                                                         \
            if (cols == NR) {                                                                 \
                v_store(row, lo[i]);                                                          \
                v_store(row + VL, hi[i]);                                                     \
            } else { /* the last panel of a width that is not a multiple of NR */            \
                float buf[NR];                                                                \
                v_store(buf, lo[i]);                                                          \
                v_store(buf + VL, hi[i]);                                                     \
                memcpy(row, buf, cols * sizeof(float));                                       \
            }                                                                                 \
        }                                                                                     \
    }
DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)
#if MR > 6
DEFINE_TILE(7)
DEFINE_TILE(8)
#endif

typedef void (*tile_fn)(const float *, int64_t, int64_t, const float *, int, float *, int64_t,
                        int, int);
static const tile_fn tiles[MR + 1] = {NULL,   tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
#if MR > 6
                                      tile_7, tile_8
#endif
};

/* Columns [p * NR, p * NR + NR) of c (rows x n, row stride n) = A @ B, for the `rows` rows of
 * A (a(i, k) as in the tiles) and panel p of B, packed by pack_panel. */
static void matmul_panel(const float *a, int64_t a_row, int64_t a_k, int rows, int k_dim,
                         const float *panel, int p, int n, float *c, int resume) {
    int cols = n - p * NR < NR ? n - p * NR : NR;
    for (int i = 0; i < rows; i += MR) {
        int m = rows - i < MR ? rows - i : MR;
        tiles[m](a + i * a_row, a_row, a_k, panel, k_dim, c + (int64_t)i * n + p * NR, n, cols,
                 resume);
    }
}

/* c (rows x n) = a (rows x k_dim, row-major) @ B, every panel of B packed by pack_panel.
 * Panel by panel, so that a panel stays in the L1 cache while every row tile uses it. */
static void matmul_panels(const float *a, int rows, int k_dim, const float *panels, int n,
                          float *c) {
    for (int p = 0; p * NR < n; p++)
        matmul_panel(a, k_dim, 1, rows, k_dim, panels + (int64_t)p * k_dim * NR, p, n, c, 0);
}

/* One thread's share: rows [first, first + rows) of every (batch, hidden) time-step block.
 * Tensors are (steps[+1], batch, hidden); the pointers below already point at row `first`
 * (but for a table `pre`, whose rows ids (steps, batch) picks). */
struct rows_job {
    int steps, rows, hidden, batch;
    int64_t block; /* batch * hidden: the distance between two time steps */
    const int64_t *ids;
    const float *pre, *panels, *b_hh, *outs, *grad_out;
    float *hs, *dh, *dz, *scratch;
};

static void forward_rows(const struct rows_job *j) {
    for (int t = 0; t < j->steps; t++) {
        float *out = j->hs + (t + 1) * j->block;
        matmul_panels(j->hs + t * j->block, j->rows, j->hidden, j->panels, j->hidden, out);
        if (j->ids)
            bias_add_tanh(out, j->pre, j->ids + t * j->batch, j->b_hh, j->rows, j->hidden);
        else
            bias_add_tanh(out, j->pre + t * j->block, NULL, j->b_hh, j->rows, j->hidden);
    }
}

static void backward_rows(const struct rows_job *j) {
    const int64_t n = (int64_t)j->rows * j->hidden;
    float *up = j->dh, *next = j->scratch;
    for (int t = j->steps - 1; t >= 0; t--) {
        const float *h = j->outs + t * j->block;
        const float *g = j->grad_out ? j->grad_out + t * j->block : NULL;
        float *d = j->dz + t * j->block;
        int64_t i = 0;
        /* dz_t = (g_t + dh_t) * (1 - h_t * h_t), each operation rounded as the framework's */
        for (; i + VL <= n; i += VL) {
            vec hv = v_load(h + i);
            vec local = v_sub(v_set1(1.0f), v_mul(hv, hv));
            vec u = v_load(up + i);
            if (g) u = v_add(v_load(g + i), u);
            v_store(d + i, v_mul(u, local));
        }
        for (; i < n; i++) {
            float local = 1.0f - h[i] * h[i];
            d[i] = (g ? g[i] + up[i] : up[i]) * local;
        }
        matmul_panels(d, j->rows, j->hidden, j->panels, j->hidden, next); /* dz_t @ W_hh */
        float *swap = up;
        up = next;
        next = swap;
    }
    if (up != j->dh) memcpy(j->dh, up, n * sizeof(float));
}

#define MAX_THREADS 64

/* Pack W_hh (transposed or not) into panels, then split the batch into `threads` runs of whole
 * rows, one per OpenMP thread (torch's own pool: built with gcc, this library shares the libgomp
 * torch loaded): the time steps stay sequential, the rows are independent, and a row's numbers
 * do not depend on the run it is in. Returns 0, or -1 when out of memory. */
static int run_split(void (*work)(const struct rows_job *), struct rows_job proto,
                     const float *w_hh, int transpose, int batch, int threads) {
    const int hidden = proto.hidden, num_panels = (hidden + NR - 1) / NR;
    size_t bytes = (size_t)num_panels * hidden * NR * sizeof(float);
    float *panels = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!panels) return -1;
    struct rows_job jobs[MAX_THREADS];
    if (threads > batch) threads = batch;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int i = 0, first = 0; i < threads; i++) {
        int rows = batch / threads + (i < batch % threads);
        int64_t offset = (int64_t)first * hidden;
        jobs[i] = proto;
        jobs[i].rows = rows;
        jobs[i].panels = panels;
        jobs[i].ids = proto.ids ? proto.ids + first : NULL;
        jobs[i].pre = proto.pre && !proto.ids ? proto.pre + offset : proto.pre;
        jobs[i].outs = proto.outs ? proto.outs + offset : NULL;
        jobs[i].grad_out = proto.grad_out ? proto.grad_out + offset : NULL;
        jobs[i].hs = proto.hs ? proto.hs + offset : NULL;
        jobs[i].dh = proto.dh ? proto.dh + offset : NULL;
        jobs[i].dz = proto.dz ? proto.dz + offset : NULL;
        jobs[i].scratch = proto.scratch ? proto.scratch + offset : NULL;
        first += rows;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int p = 0; p < num_panels; p++)
            pack_panel(w_hh, transpose ? 1 : hidden, transpose ? hidden : 1, hidden, hidden, p,
                       panels + (int64_t)p * hidden * NR);
#pragma omp for schedule(static, 1)
        for (int i = 0; i < threads; i++) work(&jobs[i]);
    }
    free(panels);
    return 0;
}

/* hs: (steps + 1, batch, hidden), hs[0] = h_0 on entry; fills hs[1..steps].
 * pre: (steps, batch, hidden), or with ids (steps, batch) a table (table_rows, hidden) whose
 * row ids[t][b] is step t's input for row b (the embedding lookup, without writing the lookup
 * out); w_hh: (hidden, hidden) row-major; b_hh: (hidden).
 * Returns 0, -1 when out of memory, -2 for an id outside [0, table_rows). */
static int tanh_recurrence_forward(int steps, int batch, int hidden, const float *pre,
                            const int64_t *ids, int table_rows, const float *w_hh,
                            const float *b_hh, float *hs, int threads) {
    for (int64_t i = 0; ids && i < (int64_t)steps * batch; i++)
        if (ids[i] < 0 || ids[i] >= table_rows) return -2;
    struct rows_job job = {.steps = steps, .hidden = hidden, .batch = batch,
                           .block = (int64_t)batch * hidden, .ids = ids, .pre = pre,
                           .b_hh = b_hh, .hs = hs};
    return run_split(forward_rows, job, w_hh, 1, batch, threads);
}

/* Sums over the rows of dz (rows x hidden), row by row in order: grad_b (hidden), when given,
 * := the column sums; grad_table (table_rows x hidden), when given, := the rows of dz added up
 * by ids (the gradient of a lookup). Threads take ranges of columns, so no sum depends on them. */
static void column_sums(int64_t rows, int hidden, const float *dz, const int64_t *ids,
                        int table_rows, float *grad_b, float *grad_table, int threads) {
    const int chunks = (hidden + VL - 1) / VL;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int chunk = 0; chunk < chunks; chunk++) {
        const int first = chunk * VL, width = hidden - first < VL ? hidden - first : VL;
        if (grad_b) memset(grad_b + first, 0, width * sizeof(float));
        for (int t = 0; grad_table && t < table_rows; t++)
            memset(grad_table + (int64_t)t * hidden + first, 0, width * sizeof(float));
        for (int64_t r = 0; r < rows; r++) {
            const float *d = dz + r * hidden + first;
            float *into[2] = {grad_b ? grad_b + first : NULL,
                              grad_table ? grad_table + ids[r] * hidden + first : NULL};
            for (int s = 0; s < 2; s++) {
                if (!into[s]) continue;
                if (width == VL) {
                    v_store(into[s], v_add(v_load(into[s]), v_load(d)));
                } else {
                    for (int i = 0; i < width; i++) into[s][i] += d[i];
                }
            }
        }
    }
}

/* Backward through time. outs = hs[1..steps]; grad_out: (steps, batch, hidden) or NULL.
 * dh: (batch, hidden), dL/dh_T on entry (zeros when absent), dL/dh_0 on exit; scratch is as
 * large. dz: (steps, batch, hidden) receives dL/dpre_t, the gradient of every step's input.
 * grad_b (hidden), when given, receives dL/db_hh, the sum of dz; grad_table (table_rows x
 * hidden), when given, the gradient of the first layer's table: dz's rows added up by ids
 * (steps, batch), the ids the forward pass looked up. Returns 0, -1 when out of memory, -2
 * for an id outside [0, table_rows). */
static int tanh_recurrence_backward(int steps, int batch, int hidden, const float *outs,
                             const float *grad_out, const float *w_hh, float *dh, float *dz,
                             float *scratch, const int64_t *ids, int table_rows, float *grad_b,
                             float *grad_table, int threads) {
    for (int64_t i = 0; grad_table && ids && i < (int64_t)steps * batch; i++)
        if (ids[i] < 0 || ids[i] >= table_rows) return -2;
    struct rows_job job = {.steps = steps, .hidden = hidden, .block = (int64_t)batch * hidden,
                           .outs = outs, .grad_out = grad_out, .dh = dh, .dz = dz,
                           .scratch = scratch};
    int status = run_split(backward_rows, job, w_hh, 0, batch, threads);
    if (status == 0 && (grad_b || (grad_table && ids)))
        column_sums((int64_t)steps * batch, hidden, dz, ids, table_rows, grad_b,
                    ids ? grad_table : NULL, threads < 1 ? 1 : threads);
    return status;
}

/* c (m x n, row-major) = A @ B for A(i, k) = a[i * a_row + k * a_k] and
 * B(k, j) = b[k * b_k + j * b_j]: strides make transposed operands free. Each element is one
 * chain of fused multiply-adds over k in order, whatever the split over `threads` OpenMP
 * threads. The inner dimension is taken KC at a time (a tile resumes its chain from the partial
 * sums stored in c, which changes no bit): B's panels for those KC rows are packed, then
 * (panel, block of rows) items are shared out; without the blocking, the panels of a long inner
 * dimension (the weight gradient's: all time steps of all rows) would overflow the L1 cache.
 * Returns 0, or -1 when out of memory. */
static int rnnlm_matmul(int m, int n, int k_dim, const float *a, int64_t a_row, int64_t a_k,
                 const float *b, int64_t b_k, int64_t b_j, float *c, int threads) {
    enum { ROW_BLOCK = 8 * MR };
    if (m <= 0 || n <= 0) return 0;
    if (k_dim <= 0) { /* an empty sum */
        memset(c, 0, (size_t)m * n * sizeof(float));
        return 0;
    }
    const int num_panels = (n + NR - 1) / NR, row_blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t panel_floats = (int64_t)KC * NR;
    float *panels = aligned_alloc(64, num_panels * panel_floats * sizeof(float));
    if (!panels) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int k0 = 0; k0 < k_dim; k0 += KC) { /* every thread runs every block, in order */
        const int depth = k_dim - k0 < KC ? k_dim - k0 : KC;
#pragma omp for schedule(static)
        for (int p = 0; p < num_panels; p++)
            pack_panel(b + k0 * b_k, b_k, b_j, depth, n, p, panels + p * panel_floats);
#pragma omp for schedule(static)
        for (int item = 0; item < num_panels * row_blocks; item++) {
            int p = item / row_blocks, first = item % row_blocks * ROW_BLOCK;
            int rows = m - first < ROW_BLOCK ? m - first : ROW_BLOCK;
            matmul_panel(a + first * a_row + k0 * a_k, a_row, a_k, rows, depth,
                         panels + p * panel_floats, p, n, c + (int64_t)first * n, k0 > 0);
        }
    }
    free(panels);
    return 0;
}

/* exp(x) for x <= 0 (the softmax's range): clamped at -80, where exp is 1.8e-35, so v_exp's
 * exponent arithmetic stays among normal floats; no sum or gradient here can see the difference.
 * max(-80, x) returns its x operand when x is NaN: a NaN logit (or inf - inf from an infinite
 * one) makes the row's loss NaN, as in the framework, so the job's non-finite check sees it. */
static inline vec v_exp_nonpositive(vec x) { return v_exp(v_max(v_set1(-80.0f), x)); }

/* One row of logits x (classes wide, the bias already added): its cross-entropy against
 * `target` (returned, in double), and, with `grad` given (which may be x), d(loss * scale)/dx
 * into it: (softmax - onehot(target)) * scale, softmax as exp(x - max) / sum. `e` is scratch of
 * `classes` rounded up to whole vectors; its padding, -inf, is left out of the max's and the
 * sum's reach (the max ignores it, the sum stops at `classes`). */
static double row_cross_entropy(const float *x, int classes, int64_t target, float scale,
                                float *grad, float *e) {
    const int padded = (classes + VL - 1) / VL * VL;
    memcpy(e, x, classes * sizeof(float));
    for (int i = classes; i < padded; i++) e[i] = -INFINITY;
    float lanes[VL];
    vec top_v = v_load(e);
    for (int j = VL; j < padded; j += VL) top_v = v_max(top_v, v_load(e + j));
    v_store(lanes, top_v);
    float top = lanes[0];
    for (int i = 1; i < VL; i++) top = lanes[i] > top ? lanes[i] : top;
    for (int j = 0; j < padded; j += VL)
        v_store(e + j, v_exp_nonpositive(v_sub(v_load(e + j), v_set1(top))));
    /* The sum in one order for both builds (element i into lane i % 8, the lanes then added in
     * turn), the padding left out: the softmax's gradient divides by it, bit for bit alike. */
    __m256 sum8 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= classes; j += 8) sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(e + j));
    float eight[8];
    _mm256_storeu_ps(eight, sum8);
    for (int i = j; i < classes; i++) eight[i - j] += e[i];
    float sum = 0.0f;
    for (int i = 0; i < 8; i++) sum += eight[i];
    const double loss = (double)top + log((double)sum) - (double)x[target];
    if (grad) { /* after the loss has read x[target] */
        const vec factor = v_set1(scale / sum);
        for (j = 0; j + VL <= classes; j += VL) v_store(grad + j, v_mul(v_load(e + j), factor));
        if (j < classes) {
            v_store(lanes, v_mul(v_load(e + j), factor));
            memcpy(grad + j, lanes, (classes - j) * sizeof(float));
        }
        grad[target] -= scale;
    }
    return loss;
}

/* The output layer and the training loss of `rows` rows, in one call: logits = x W^T + b
 * (x: rows x hidden, w: classes x hidden, row-major), and the mean cross-entropy against
 * `targets` into *mean. With grad_x given, also the gradients of that mean: dlogits =
 * (softmax - onehot) / rows (into `logits`, which is scratch: rows x classes), grad_x =
 * dlogits W (rows x hidden), grad_w = dlogits^T x (classes x hidden), grad_b = the column sums
 * of dlogits in row order. The rows are shared out in blocks, everything of a row computed where
 * the row is; the row losses are summed in row order in double; so no result depends on
 * `threads`. The layer's products are the tiles' (the bias added to the finished product, as
 * nn.Linear does). Returns 0, -1 when out of memory, -2 for a target outside [0, classes). */
static int rnnlm_linear_cross_entropy(int rows, int hidden, int classes, const float *x,
                               const float *w, const float *b, const int64_t *targets,
                               float *logits, float *mean, float *grad_x, float *grad_w,
                               float *grad_b, int threads) {
    enum { ROW_BLOCK = 8 * MR };
    if (rows <= 0 || classes <= 0) { /* the mean of nothing, as the framework gives it */
        *mean = NAN;
        return 0;
    }
    for (int r = 0; r < rows; r++)
        if (targets[r] < 0 || targets[r] >= classes) return -2;
    const int logit_panels = (classes + NR - 1) / NR, input_panels = (hidden + NR - 1) / NR;
    const int blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    const int64_t wt_floats = (int64_t)logit_panels * hidden * NR;
    const int64_t w_floats = grad_x ? (int64_t)input_panels * classes * NR : 0;
    if (threads < 1) threads = 1;
    float *panels = aligned_alloc(64, (wt_floats + w_floats) * sizeof(float));
    double *losses = malloc((size_t)rows * sizeof(double));
    const int padded = (classes + VL - 1) / VL * VL;
    float *exps = malloc((size_t)threads * padded * sizeof(float));
    int status = panels && losses && exps ? 0 : -1;
    if (status == 0) {
        const float scale = 1.0f / (float)rows;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            float *e = exps + (int64_t)omp_get_thread_num() * padded; /* softmax numerators */
#pragma omp for schedule(static)
            for (int p = 0; p < logit_panels; p++) /* W^T: hidden x classes */
                pack_panel(w, 1, hidden, hidden, classes, p, panels + p * (int64_t)hidden * NR);
#pragma omp for schedule(static)
            for (int p = 0; p < (grad_x ? input_panels : 0); p++) /* W: classes x hidden */
                pack_panel(w, hidden, 1, classes, hidden, p,
                           panels + wt_floats + p * (int64_t)classes * NR);
#pragma omp for schedule(static)
            for (int block = 0; block < blocks; block++) {
                const int first = block * ROW_BLOCK;
                const int n = rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK;
                const float *xb = x + (int64_t)first * hidden;
                float *lb = logits + (int64_t)first * classes;
                for (int p = 0; p < logit_panels; p++)
                    matmul_panel(xb, hidden, 1, n, hidden, panels + p * (int64_t)hidden * NR,
                                 p, classes, lb, 0);
                for (int r = 0; r < n; r++) {
                    float *row = lb + (int64_t)r * classes;
                    for (int i = 0; i < classes; i++) row[i] += b[i];
                    losses[first + r] = row_cross_entropy(row, classes, targets[first + r],
                                                          scale, grad_x ? row : NULL, e);
                }
                if (grad_x)
                    for (int p = 0; p < input_panels; p++)
                        matmul_panel(lb, classes, 1, n, classes,
                                     panels + wt_floats + p * (int64_t)classes * NR, p, hidden,
                                     grad_x + (int64_t)first * hidden, 0);
            }
        }
        double total = 0.0;
        for (int r = 0; r < rows; r++) total += losses[r];
        *mean = (float)(total / rows);
        if (grad_x) {
            for (int i = 0; i < classes; i++) grad_b[i] = 0.0f;
            for (int r = 0; r < rows; r++)
                for (int i = 0; i < classes; i++) grad_b[i] += logits[(int64_t)r * classes + i];
            status = rnnlm_matmul(classes, hidden, rows, logits, 1, classes, x, hidden, 1,
                                  grad_w, threads);
        }
    }
    free(panels);
    free(losses);
    free(exps);
    return status;
}

/* The squares of a clipping norm, summed in double in 16 lanes (element i of each gradient into
 * lane i % 16, the rest of a gradient shorter than a multiple of 16 into *tail), the same in both
 * builds. */
typedef struct {
    __m256d lanes[4];
    double tail;
} squares_sum;

static squares_sum no_squares(void) {
    squares_sum sum = {{_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                        _mm256_setzero_pd()},
                       0.0};
    return sum;
}

static void add_squares(squares_sum *sum, const float *g, int64_t size) {
    int64_t i = 0;
    for (; i + 16 <= size; i += 16)
        for (int q = 0; q < 4; q++) {
            __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(g + i + 4 * q));
            sum->lanes[q] = _mm256_add_pd(sum->lanes[q], _mm256_mul_pd(v, v));
        }
    for (; i < size; i++) sum->tail += (double)g[i] * g[i];
}

/* The clipping and the step once the squares are summed: norm = their square root, scale =
 * max_norm / norm clamped at 1 (NaN stays NaN, as in the framework's clamp); then every gradient
 * g *= scale and its parameter p -= lr * g. The norm before clipping goes to *norm_out. */
static void clip_and_step(const squares_sum *sum, int count, float *const *params,
                          float *const *grads, const int64_t *sizes, float *norm_out,
                          float max_norm, float lr) {
    double lanes[16];
    for (int q = 0; q < 4; q++) _mm256_storeu_pd(lanes + 4 * q, sum->lanes[q]);
    double squares = sum->tail;
    for (int q = 0; q < 16; q++) squares += lanes[q];
    const float norm = (float)sqrt(squares);
    float scale = max_norm / norm;
    if (scale > 1.0f) scale = 1.0f;
    const vec scale_v = v_set1(scale), lr_v = v_set1(lr);
    for (int t = 0; t < count; t++) {
        float *p = params[t], *g = grads[t];
        int64_t i = 0;
        for (; i + VL <= sizes[t]; i += VL) {
            vec gv = v_mul(v_load(g + i), scale_v);
            v_store(g + i, gv);
            v_store(p + i, v_sub(v_load(p + i), v_mul(lr_v, gv)));
        }
        for (; i < sizes[t]; i++) {
            g[i] *= scale;
            p[i] -= lr * g[i];
        }
    }
    *norm_out = norm;
}

/* d2l's gradient clipping and the SGD step, in one call over `count` parameters: norm = the L2
 * norm of all gradients together, then as clip_and_step: one pass to sum the squares and one to
 * scale and step, where the framework's clipping and optimizer make several. */
void rnnlm_clip_sgd(int count, float *const *params, float *const *grads, const int64_t *sizes,
                    float *norm_out, float max_norm, float lr) {
    squares_sum sum = no_squares();
    for (int t = 0; t < count; t++) add_squares(&sum, grads[t], sizes[t]);
    clip_and_step(&sum, count, params, grads, sizes, norm_out, max_norm, lr);
}

/* One training step of the chapter's model (one tanh layer, the output layer, the mean
 * cross-entropy), forward and backward, in one call. Shapes: ids and targets
 * (batch, steps), as minibatches come; h0 and h_last (batch, hidden); w_ih (hidden, vocab),
 * b_ih, b_hh (hidden), w_hh (hidden, hidden), w_out (classes, hidden), b_out (classes); every
 * gradient the shape of its parameter. b_ih's gradient is the column sums of grad_table
 * (vocab, hidden), the gradient of the table W_ih^T + b_ih: left to the caller. In order: the
 * table, the recurrence, the output layer and loss (logits in time-major order, as the model's),
 * backward through time from dL/dh_T = 0 (the next minibatch starts from a detached state), and
 * dL/dW_hh = dz^T [h_0 .. h_{T-1}].
 * Returns 0, -1 when out of memory, -2 for an id outside [0, vocab), -3 for a target outside
 * [0, classes). */
int rnnlm_rnn_train_step(int steps, int batch, int hidden, int vocab, int classes,
                         const int64_t *ids, const int64_t *targets, const float *h0,
                         const float *w_ih, const float *b_ih, const float *w_hh,
                         const float *b_hh, const float *w_out, const float *b_out,
                         float *h_last, float *mean, float *grad_table, float *grad_w_ih,
                         float *grad_w_hh, float *grad_b_hh, float *grad_w_out, float *grad_b_out,
                         int threads) {
    const int64_t rows = (int64_t)steps * batch, block = (int64_t)batch * hidden;
    for (int64_t i = 0; i < rows; i++) {
        if (ids[i] < 0 || ids[i] >= vocab) return -2;
        if (targets[i] < 0 || targets[i] >= classes) return -3;
    }
    int64_t *by_time = malloc(2 * rows * sizeof(int64_t)); /* ids, then targets, time-major */
    float *table = malloc((size_t)vocab * hidden * sizeof(float));
    float *hs = malloc((size_t)(rows + batch) * hidden * sizeof(float)); /* h_0 .. h_T */
    /* dL/dh_t from the output layer, overwritten in place by dz_t = dL/dpre_t (the backward
     * pass reads each element before it writes it): one buffer less in the cache */
    float *grad_x = malloc((size_t)rows * hidden * sizeof(float));
    float *logits = malloc((size_t)rows * classes * sizeof(float));
    float *dh = calloc((size_t)block * 2, sizeof(float)); /* dL/dh_T = 0, and its scratch */
    int status = by_time && table && hs && grad_x && logits && dh ? 0 : -1;
    if (status == 0) {
        for (int t = 0; t < steps; t++)
            for (int b = 0; b < batch; b++) {
                by_time[t * batch + b] = ids[(int64_t)b * steps + t];
                by_time[rows + t * batch + b] = targets[(int64_t)b * steps + t];
            }
        for (int v = 0; v < vocab; v++) /* one_hot(v) W_ih^T + b_ih, as the lookup's table */
            for (int h = 0; h < hidden; h++)
                table[(int64_t)v * hidden + h] = w_ih[(int64_t)h * vocab + v] + b_ih[h];
        memcpy(hs, h0, block * sizeof(float));
        status = tanh_recurrence_forward(steps, batch, hidden, table, by_time, vocab, w_hh,
                                         b_hh, hs, threads);
    }
    if (status == 0) {
        memcpy(h_last, hs + steps * block, block * sizeof(float));
        status = rnnlm_linear_cross_entropy((int)rows, hidden, classes, hs + block, w_out, b_out,
                                            by_time + rows, logits, mean, grad_x, grad_w_out,
                                            grad_b_out, threads);
    }
    if (status == 0)
        status = tanh_recurrence_backward(steps, batch, hidden, hs + block, grad_x, w_hh, dh,
                                          grad_x, dh + block, by_time, vocab, grad_b_hh,
                                          grad_table, threads);
    if (status == 0) /* grad_x holds dz now */
        status = rnnlm_matmul(hidden, hidden, (int)rows, grad_x, 1, hidden, hs, hidden, 1,
                              grad_w_hh, threads);
    if (status == 0) /* grad_table transposed */
        for (int h = 0; h < hidden; h++)
            for (int v = 0; v < vocab; v++)
                grad_w_ih[(int64_t)h * vocab + v] = grad_table[(int64_t)v * hidden + h];
    free(by_time);
    free(table);
    free(hs);
    free(grad_x);
    free(logits);
    free(dh);
    return status;
}
