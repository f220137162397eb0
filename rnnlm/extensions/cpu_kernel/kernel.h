/* The kernel's two entry points (kernel.c), as ops.cpp calls them. */
#ifndef RNNLM_CPU_KERNEL_H
#define RNNLM_CPU_KERNEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One training step of the chapter's model, forward and backward; see kernel.c. Returns 0, -1
 * when out of memory, -2 for an id outside [0, vocab), -3 for a target outside [0, classes). */
int rnnlm_rnn_train_step(int steps, int batch, int hidden, int vocab, int classes,
                         const int64_t *ids, const int64_t *targets, const float *h0,
                         const float *w_ih, const float *b_ih, const float *w_hh,
                         const float *b_hh, const float *w_out, const float *b_out,
                         float *h_last, float *mean, float *grad_table, float *grad_w_ih,
                         float *grad_w_hh, float *grad_b_hh, float *grad_w_out, float *grad_b_out,
                         int threads);

/* d2l's gradient clipping to the global L2 norm, then p -= lr * grad, for `count` parameters;
 * the norm before clipping goes to *norm_out. */
void rnnlm_clip_sgd(int count, float *const *params, float *const *grads, const int64_t *sizes,
                    float *norm_out, float max_norm, float lr);

#ifdef __cplusplus
}
#endif

#endif
