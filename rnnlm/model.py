"""The chapter's RNN language model: one-hot characters -> recurrent layers -> linear head.

The model knows nothing of parallelism; DDP wraps it from outside.

On the CPU, the chapter's cell (``rnn``, tanh, no dropout) takes a faster route to the same
numbers (see :class:`TanhRecurrence`): ``one_hot(x) @ W_ih^T`` is exactly the row lookup
``W_ih^T[x]``, and the backward pass through time is written out so that the weight gradients
are one large matrix product instead of one small product per time step. The parameters are
still those of ``nn.RNN``, so the state_dict is unchanged. Where the job loads it, the compiled
kernel (:mod:`rnnlm.native`, :class:`CompiledTanhRecurrence`) runs that recurrence instead, one
call per sequence and direction (looking the first layer's inputs up itself), and the matrix
products of the weight gradients and of the output layer (:class:`CompiledLinear`); given the
targets, the output layer, the loss and their gradients are one call
(:class:`CompiledLinearCrossEntropy`). Training the one-layer model skips even these:
:class:`rnnlm.loop.CompiledStep` runs its whole step in one kernel call, outside autograd, with
the same bits. On CUDA, and for GRU/LSTM, the framework's layer (cuDNN on a GPU) runs as in the
chapter.

Shape legend: ``B`` batch rows, ``T`` time steps, ``V`` vocabulary size, ``H`` hidden units,
``L`` layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from rnnlm.config import ModelConfig
from rnnlm.native import TanhRecurrenceKernel

# A GRU/RNN state is one tensor (L, B, H); an LSTM state is the pair (h, c).
State = Tensor | tuple[Tensor, Tensor]

_CELLS: dict[str, type[nn.RNN] | type[nn.GRU] | type[nn.LSTM]] = {
    "rnn": nn.RNN,
    "gru": nn.GRU,
    "lstm": nn.LSTM,
}


class RNNLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built in the chapter's order (recurrent layer, then head) so that a seeded
        # initialisation gives the chapter's initial weights.
        self.rnn = _CELLS[config.cell](
            config.vocab_size,
            config.num_hiddens,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.linear = nn.Linear(config.num_hiddens, config.vocab_size)

        # The hand-written CPU path for the chapter's cell; switch it off to run ``nn.RNN``.
        self.fast_cpu = config.cell == "rnn" and (config.num_layers == 1 or config.dropout == 0)
        # The compiled recurrence (rnnlm.native) when the job chose it: the same model, every
        # time step in one call; None runs the framework's operations.
        self.kernel: TanhRecurrenceKernel | None = None

    def forward(
        self, inputs: Tensor, state: State, targets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """``inputs`` (B, T) token ids -> logits (T*B, V) in time-major order, new state.
        Given ``targets`` (B, T), the mean cross-entropy of those logits against them takes the
        logits' place (the training loss: with the compiled kernel, one call computes the
        output layer, the loss and their gradients)."""
        if self.fast_cpu and inputs.device.type == "cpu" and isinstance(state, Tensor):
            y, state = self._tanh_layers(inputs.T.long(), state)
        else:
            x = F.one_hot(inputs.T.long(), self.config.vocab_size).to(torch.float32)  # (T, B, V)
            y, state = self.rnn(x, state)  # y: (T, B, H)
        flat = y.reshape(-1, y.shape[-1])
        linear, compiled = self.linear, self._use_kernel(y, len(y))
        if targets is None:
            if compiled:
                return CompiledLinear.apply(self.kernel, flat, linear.weight, linear.bias), state
            return linear(flat), state
        labels = targets.T.reshape(-1).long()  # time-major, as the logits
        if compiled:
            args = (self.kernel, flat, linear.weight, linear.bias, labels)
            return CompiledLinearCrossEntropy.apply(*args), state
        return F.cross_entropy(linear(flat).float(), labels), state

    def _use_kernel(self, values: Tensor, steps: int) -> bool:
        """The compiled kernel runs float32 sequences: one time step per call (text generation)
        takes the framework's operations, as the kernel reorganises its weights at every call,
        which pays off over a sequence and made a one-step recurrence 3x slower."""
        return self.kernel is not None and values.dtype == torch.float32 and steps > 1

    def _tanh_layers(self, ids: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``nn.RNN``'s CPU computation, layer by layer: the input projection of the whole
        sequence first (for layer 0 a row lookup, exact for one-hot inputs), then the
        recurrence. ``ids`` (T, B), ``state`` (L, B, H) -> outputs (T, B, H), state (L, B, H)."""
        finals = []
        y = ids
        for layer in range(self.config.num_layers):
            w_ih, b_ih, w_hh, b_hh = self.layer_weights(layer)
            lookup: Tensor | None = None  # set: pre is the table; the kernel looks rows up
            if layer == 0:
                pre = input_table(w_ih, b_ih)
                if self._use_kernel(pre, len(y)):
                    lookup = y.contiguous()
                else:
                    pre = F.embedding(y, pre)  # rows gather fast
            else:
                pre = F.linear(y, w_ih, b_ih)
            if lookup is not None or self._use_kernel(pre, len(pre)):
                y, h_last = CompiledTanhRecurrence.apply(
                    self.kernel, pre, state[layer], w_hh, b_hh, lookup
                )
            else:
                y, h_last = TanhRecurrence.apply(pre, state[layer], w_hh, b_hh)
            finals.append(h_last)
        return y, torch.stack(finals)

    def layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``nn.RNN``'s W_ih, b_ih, W_hh, b_hh of one layer."""
        names = ("weight_ih_l", "bias_ih_l", "weight_hh_l", "bias_hh_l")
        return tuple(getattr(self.rnn, f"{name}{layer}") for name in names)

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zeros of shape (L, B, H); a pair of them for an LSTM."""
        shape = (self.config.num_layers, batch_size, self.config.num_hiddens)
        if self.config.cell == "lstm":
            return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        return torch.zeros(shape, device=device)


def input_table(w_ih: Tensor, b_ih: Tensor) -> Tensor:
    """The first layer's (V, H) input table W_ih^T + b_ih: one_hot(y) @ W_ih^T + b_ih picks row
    y of W_ih^T and adds b_ih, the same single rounding as looking row y up in this table."""
    return (w_ih.t() + b_ih).contiguous()


class TanhRecurrence(torch.autograd.Function):
    """``h_t = tanh(pre_t + h_{t-1} W_hh^T + b_hh)`` for t = 1..T, with backprop through time
    written out.

    The forward pass performs ``nn.RNN``'s CPU operations in the same order (``addmm`` with the
    bias, add the projected input, ``tanh``). The backward pass keeps only what is truly
    sequential in the loop -- ``dh_{t-1} = dz_t W_hh`` -- and computes the weight gradient
    ``sum_t dz_t^T h_{t-1}`` as ONE (H x T*B) @ (T*B x H) product after it, where autograd
    would run T small products and T accumulations. Same sums, different order of the float
    additions: differences at round-off level (tests/test_numerics.py bounds them).
    """

    @staticmethod
    def forward(
        ctx: Any, pre: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor
    ) -> tuple[Tensor, Tensor]:
        num_steps, batch, hidden = pre.shape
        # hs[0] = h_0, hs[t] = h_t: the outputs and, shifted by one, every step's previous
        # state (needed for the weight gradient) in one buffer, without a copy.
        hs = pre.new_empty(num_steps + 1, batch, hidden)
        hs[0] = h0
        w_t = w_hh.t()
        for t in range(num_steps):
            h = torch.addmm(b_hh, hs[t], w_t, out=hs[t + 1])
            h.add_(pre[t]).tanh_()
        ctx.save_for_backward(hs, w_hh)
        ctx.set_materialize_grads(False)
        return hs[1:], hs[-1].clone()

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_last: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hs, w_hh = ctx.saved_tensors
        out = hs[1:]
        num_steps = out.shape[0]
        local = 1 - out * out  # tanh'(z_t), as tanh_backward computes it
        dz = torch.empty_like(out)
        dh = grad_last
        for t in range(num_steps - 1, -1, -1):
            # dL/dh_t comes from the output at t and from step t+1; dL/dz_t = that * tanh'.
            if grad_out is None:
                dz[t] = 0 if dh is None else dh
            elif dh is None:
                dz[t] = grad_out[t]
            else:
                torch.add(grad_out[t], dh, out=dz[t])
            dz[t].mul_(local[t])
            dh = dz[t] @ w_hh if t > 0 or ctx.needs_input_grad[1] else None
        grad_w, grad_b = _weight_grads(dz, hs, *ctx.needs_input_grad[2:4])
        return dz, dh, grad_w, grad_b


class CompiledTanhRecurrence(torch.autograd.Function):
    """:class:`TanhRecurrence` with each direction in one call of the compiled kernel.

    Given ``ids`` (T, B), ``pre`` is the first layer's (V, H) table and the kernel looks each
    step's rows up itself: the (T, B, H) lookup is never written out, and the table's gradient
    is the rows of ``dL/dpre_t`` added up by id (``index_add_``; the framework's embedding
    backward took twice as long).

    The step's matrix products are the kernel's own (each element one FMA chain in order) and
    so is ``tanh`` (within 2 ulp of the exact value, where torch's differs by < 1 ulp), so
    outputs match the framework path to round-off, not bit for bit. The backward's elementwise
    operations round as :class:`TanhRecurrence`'s do; the weight gradient is the same one large
    product, computed by the kernel.
    """

    @staticmethod
    def forward(
        ctx: Any,
        kernel: TanhRecurrenceKernel,
        pre: Tensor,
        h0: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        num_steps = len(pre) if ids is None else len(ids)
        hs = pre.new_empty(num_steps + 1, *h0.shape)
        hs[0] = h0
        w_hh = w_hh.contiguous()
        kernel.forward(pre.contiguous(), w_hh, b_hh.contiguous(), hs, ids)
        ctx.kernel, ctx.table_rows = kernel, None if ids is None else len(pre)
        ctx.save_for_backward(hs, w_hh, ids)
        ctx.set_materialize_grads(False)
        return hs[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_last: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hs, w_hh, ids = ctx.saved_tensors
        outs = hs[1:]
        hidden = outs.shape[-1]
        dh = hs.new_zeros(outs.shape[1:]) if grad_last is None else grad_last.contiguous().clone()
        dz = torch.empty_like(outs)
        grad = None if grad_out is None else grad_out.contiguous()
        need_pre, need_h0, need_w, need_b = ctx.needs_input_grad[1:5]
        grad_b = hs.new_empty(hidden) if need_b else None
        grad_table = None  # the first layer's: dz's rows added up by id, in the same call
        if ids is not None and need_pre:
            grad_table = hs.new_empty(ctx.table_rows, hidden)
        ctx.kernel.backward(outs, grad, w_hh, dh, dz, grad_b, ids, grad_table)
        grad_w, _ = _weight_grads(dz, hs, need_w, False, ctx.kernel)
        grad_pre = dz if ids is None else grad_table
        return None, grad_pre, dh if need_h0 else None, grad_w, grad_b, None


class CompiledLinear(torch.autograd.Function):
    """The output layer, ``x @ W^T + b``, with the compiled kernel's products: torch's BLAS
    takes its AVX2 path on AMD CPUs, where the kernel's AVX-512 build ran the layer's three
    products in 0.26 ms against 0.57 ms (1,120 rows, one thread). As ``nn.Linear`` does, the
    bias is added to the finished product."""

    @staticmethod
    def forward(
        ctx: Any, kernel: TanhRecurrenceKernel, x: Tensor, weight: Tensor, bias: Tensor
    ) -> Tensor:
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight)
        return kernel.matmul(x, weight.t()).add_(bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        kernel: TanhRecurrenceKernel = ctx.kernel
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        grad_x = kernel.matmul(grad, weight) if need_x else None
        # (x^T grad)^T: 256 rows of output in 8-row tiles keep more of the vector units busy
        # than W's 28 rows (0.10 against 0.17 ms)
        grad_w = kernel.matmul(x.t(), grad).t().contiguous() if need_w else None
        return None, grad_x, grad_w, grad.sum(dim=0) if need_b else None


class CompiledLinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(x @ W^T + b, targets)``, the mean over rows, in ONE kernel call that
    also computes the gradients (softmax - onehot, then its three products): the framework
    took ten operations and five autograd nodes for this. The backward pass hands them out,
    scaled by the incoming gradient (1 for ``loss.backward()``). Matches the framework to
    round-off; a NaN or infinite logit makes the loss NaN."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel: TanhRecurrenceKernel,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        targets: Tensor,
    ) -> Tensor:
        x, weight, bias, targets = (t.contiguous() for t in (x, weight, bias, targets))
        gradients = any(ctx.needs_input_grad[1:4])
        mean, ctx.grads = kernel.linear_cross_entropy(x, weight, bias, targets, gradients)
        return mean

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        if grad.item() != 1.0:
            grads = tuple(g * grad for g in grads)
        needs = ctx.needs_input_grad[1:4]
        return None, *(g if need else None for g, need in zip(grads, needs, strict=True)), None


def _weight_grads(
    dz: Tensor,
    hs: Tensor,
    need_w: bool,
    need_b: bool,
    kernel: TanhRecurrenceKernel | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``dL/dW_hh = sum_t dz_t^T h_{t-1}`` as ONE (H x T*B) @ (T*B x H) product (the compiled
    kernel's where given: torch's BLAS takes its AVX2 path on AMD CPUs), and
    ``dL/db_hh = sum_t dz_t``; ``hs`` holds h_0..h_T."""
    hidden = dz.shape[-1]
    flat = dz.reshape(-1, hidden)
    grad_w = None
    if need_w:
        previous = hs[:-1].reshape(-1, hidden)
        grad_w = (kernel.matmul if kernel else torch.mm)(flat.t(), previous)
    return grad_w, flat.sum(dim=0) if need_b else None


def detach_state(state: State) -> State:
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()
