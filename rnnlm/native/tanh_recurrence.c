/* The chapter's recurrence h_t = tanh(h_{t-1} W_hh^T + b_hh + pre_t) and its backward pass,
 * one call per sequence instead of several framework operations per time step.
 *
 * The matrix products run in the BLAS that torch itself links (MKL on x86-64; its functions
 * are handed over once by tanh_recurrence_init), through MKL's packed-matrix interface: W_hh is
 * reorganised once per sequence instead of once per time step. The elementwise work of a step
 * is one fused pass. Every output row depends only on its own input row, so splitting the batch
 * across ranks changes no bit. Built by rnnlm/native/__init__.py (x86-64 with AVX2 and FMA).
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

static pack_size_fn pack_size;
static pack_fn pack;
static compute_fn compute;

void tanh_recurrence_init(pack_size_fn size_fn, pack_fn pack_fn_, compute_fn compute_fn_) {
    pack_size = size_fn;
    pack = pack_fn_;
    compute = compute_fn_;
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
    return _mm256_blendv_ps(large, small, use_small);
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
static float *packed_weight(const char *op, const float *w_hh, int batch, int hidden) {
    const float one = 1.0f;
    float *buf = malloc(pack_size("A", &hidden, &batch, &hidden));
    if (buf) pack("A", op, &hidden, &batch, &hidden, &one, w_hh, &hidden, buf);
    return buf;
}

/* hs: (steps + 1, batch, hidden), hs[0] = h_0 on entry; fills hs[1..steps].
 * pre: (steps, batch, hidden); w_hh: (hidden, hidden) row-major; b_hh: (hidden).
 * Returns 0, or -1 when out of memory. */
int tanh_recurrence_forward(int steps, int batch, int hidden, const float *pre,
                            const float *w_hh, const float *b_hh, float *hs) {
    const int64_t block = (int64_t)batch * hidden;
    const float zero = 0.0f;
    /* Row-major out (batch, hidden) = prev @ W_hh^T is column-major out^T = W_hh prev^T. */
    float *w = packed_weight("T", w_hh, batch, hidden);
    if (!w) return -1;
    for (int t = 0; t < steps; t++) {
        float *out = hs + (t + 1) * block;
        compute("P", "N", &hidden, &batch, &hidden, w, &hidden, hs + t * block, &hidden, &zero,
                out, &hidden);
        bias_add_tanh(out, pre + t * block, b_hh, batch, hidden);
    }
    free(w);
    return 0;
}

/* Backward through time. outs = hs[1..steps]; grad_out: (steps, batch, hidden) or NULL.
 * dh: (batch, hidden), dL/dh_T on entry (zeros when absent), dL/dh_0 on exit; scratch is as
 * large. dz: (steps, batch, hidden) receives dL/dpre_t, the gradient of every step's input.
 * Returns 0, or -1 when out of memory. */
int tanh_recurrence_backward(int steps, int batch, int hidden, const float *outs,
                             const float *grad_out, const float *w_hh, float *dh,
                             float *dz, float *scratch) {
    const int64_t block = (int64_t)batch * hidden;
    const float zero = 0.0f;
    float *w = packed_weight("N", w_hh, batch, hidden); /* dh_{t-1} = dz_t @ W_hh */
    if (!w) return -1;
    float *up = dh, *next = scratch;
    for (int t = steps - 1; t >= 0; t--) {
        const float *h = outs + t * block;
        const float *g = grad_out ? grad_out + t * block : NULL;
        float *d = dz + t * block;
        int64_t i = 0;
        /* dz_t = (g_t + dh_t) * (1 - h_t * h_t), each operation rounded as the framework's */
        for (; i + 8 <= block; i += 8) {
            __m256 hv = _mm256_loadu_ps(h + i);
            __m256 local = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(hv, hv));
            __m256 u = _mm256_loadu_ps(up + i);
            if (g) u = _mm256_add_ps(_mm256_loadu_ps(g + i), u);
            _mm256_storeu_ps(d + i, _mm256_mul_ps(u, local));
        }
        for (; i < block; i++) {
            float local = 1.0f - h[i] * h[i];
            d[i] = (g ? g[i] + up[i] : up[i]) * local;
        }
        compute("P", "N", &hidden, &batch, &hidden, w, &hidden, d, &hidden, &zero, next,
                &hidden);
        float *swap = up;
        up = next;
        next = swap;
    }
    if (up != dh) memcpy(dh, up, block * sizeof(float));
    free(w);
    return 0;
}
