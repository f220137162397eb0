// The kernel's two entry points (kernel.c) as PyTorch operators in the namespace rnnlm_cpu,
// registered with the dispatcher: their schemas type every argument, and the checks below
// refuse a tensor the C code would read or write out of bounds. Autograd is registered from
// Python (ops.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "kernel.h"

namespace {

using at::Tensor;

void check(const Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape, name,
              ": expected a CPU ", dtype, " tensor of shape ", shape, ", got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The mean cross-entropy of one minibatch and the new state, with the gradients of the loss for
// the six parameters, all from one call: ids, targets (B, T) int64; h0 (B, H); an nn.RNN
// layer's w_ih (H, V), b_ih, w_hh (H, H), b_hh; the output layer's w_out (V', H), b_out.
Outputs rnn_train_loss(const Tensor& ids_in, const Tensor& targets_in, const Tensor& h0_in,
                       const Tensor& w_ih, const Tensor& b_ih, const Tensor& w_hh,
                       const Tensor& b_hh, const Tensor& w_out, const Tensor& b_out) {
  TORCH_CHECK(ids_in.dim() == 2, "ids: expected (batch, steps), got ", ids_in.sizes());
  const Tensor ids = ids_in.contiguous(), targets = targets_in.contiguous();
  const Tensor h0 = h0_in.contiguous();
  const int64_t batch = ids.size(0), steps = ids.size(1), hidden = w_hh.size(0);
  const int64_t vocab = w_ih.size(1), classes = w_out.size(0);
  check(ids, at::kLong, {batch, steps}, "ids");
  check(targets, at::kLong, {batch, steps}, "targets");
  check(h0, at::kFloat, {batch, hidden}, "h0");
  check(w_ih, at::kFloat, {hidden, vocab}, "w_ih");
  check(b_ih, at::kFloat, {hidden}, "b_ih");
  check(w_hh, at::kFloat, {hidden, hidden}, "w_hh");
  check(b_hh, at::kFloat, {hidden}, "b_hh");
  check(w_out, at::kFloat, {classes, hidden}, "w_out");
  check(b_out, at::kFloat, {classes}, "b_out");
  const auto options = h0.options();
  Tensor loss = at::empty({}, options), h_last = at::empty({batch, hidden}, options);
  Tensor grad_table = at::empty({vocab, hidden}, options);
  Tensor grad_w_ih = at::empty_like(w_ih), grad_w_hh = at::empty_like(w_hh);
  Tensor grad_b_hh = at::empty_like(b_hh), grad_w_out = at::empty_like(w_out);
  Tensor grad_b_out = at::empty_like(b_out);
  const int status = rnnlm_rnn_train_step(
      steps, batch, hidden, vocab, classes, ids.data_ptr<int64_t>(),
      targets.data_ptr<int64_t>(), h0.data_ptr<float>(), w_ih.data_ptr<float>(),
      b_ih.data_ptr<float>(), w_hh.data_ptr<float>(), b_hh.data_ptr<float>(),
      w_out.data_ptr<float>(), b_out.data_ptr<float>(), h_last.data_ptr<float>(),
      loss.data_ptr<float>(), grad_table.data_ptr<float>(), grad_w_ih.data_ptr<float>(),
      grad_w_hh.data_ptr<float>(), grad_b_hh.data_ptr<float>(), grad_w_out.data_ptr<float>(),
      grad_b_out.data_ptr<float>(), at::get_num_threads());
  TORCH_CHECK(status != -2, "ids: an id is outside [0, ", vocab, ")");
  TORCH_CHECK(status != -3, "targets: a target is outside [0, ", classes, ")");
  TORCH_CHECK(status == 0, "rnn_train_loss: out of memory");
  // b_ih's gradient is the table's column sums, as autograd would sum them.
  return {loss,      h_last,    grad_w_ih,  at::sum(grad_table, 0),
          grad_w_hh, grad_b_hh, grad_w_out, grad_b_out};
}

// d2l's gradient clipping to the global L2 norm max_norm, then p -= lr * grad, in place, for
// every parameter and its gradient; returns the norm before clipping.
Tensor clip_sgd_(at::TensorList params, at::TensorList grads, double max_norm, double lr) {
  TORCH_CHECK(params.size() == grads.size(), "clip_sgd_: ", params.size(), " parameters and ",
              grads.size(), " gradients");
  std::vector<float*> param_ptrs, grad_ptrs;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < params.size(); i++) {
    check(params[i], at::kFloat, params[i].sizes(), "params");
    check(grads[i], at::kFloat, params[i].sizes(), "grads");
    param_ptrs.push_back(params[i].data_ptr<float>());
    grad_ptrs.push_back(grads[i].data_ptr<float>());
    sizes.push_back(params[i].numel());
  }
  Tensor norm = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  rnnlm_clip_sgd(static_cast<int>(params.size()), param_ptrs.data(), grad_ptrs.data(),
                 sizes.data(), norm.data_ptr<float>(), static_cast<float>(max_norm),
                 static_cast<float>(lr));
  return norm;
}

}  // namespace

TORCH_LIBRARY(rnnlm_cpu, m) {
  m.def(
      "rnn_train_loss(Tensor ids, Tensor targets, Tensor h0, Tensor w_ih, Tensor b_ih, "
      "Tensor w_hh, Tensor b_hh, Tensor w_out, Tensor b_out) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("clip_sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, float max_norm, float lr) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnlm_cpu, CPU, m) {
  m.impl("rnn_train_loss", &rnn_train_loss);
  m.impl("clip_sgd_", &clip_sgd_);
}
