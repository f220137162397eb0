"""The operators' Python side: their autograd and their shapes for tracing, registered with
``torch.library`` once the library is loaded (see :func:`register`).

``rnnlm_cpu::rnn_train_loss`` computes the loss and, in the same call, its gradients; its
backward pass hands those over (scaled by the incoming gradient), so autograd, and with it
DDP's gradient hooks, see an ordinary operator whose parameters receive gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor

TRAIN_LOSS = "rnnlm_cpu::rnn_train_loss"


@cache
def register() -> None:
    """Register autograd and fake (shape-only) implementations; once per process."""
    torch.library.register_autograd(TRAIN_LOSS, _backward, setup_context=_setup_context)
    torch.library.register_fake(TRAIN_LOSS)(_train_loss_shapes)
    torch.library.register_fake("rnnlm_cpu::clip_sgd_")(_clip_sgd_shapes)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.grads = output[2:]
    # The new state is carried to the next minibatch detached (truncated BPTT), and the
    # gradients are results, not values a loss may depend on.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    grads, ctx.grads = ctx.grads, None
    if grad_loss is None:
        return (None,) * 9
    return (None, None, None, *(g * grad_loss for g in grads))


def _train_loss_shapes(
    ids: Tensor, targets: Tensor, h0: Tensor, *params: Tensor
) -> tuple[Tensor, ...]:
    return (h0.new_empty(()), torch.empty_like(h0), *(torch.empty_like(p) for p in params))


def _clip_sgd_shapes(
    params: list[Tensor], grads: list[Tensor], max_norm: float, lr: float
) -> Tensor:
    return params[0].new_empty(())


def train_loss(
    ids: Tensor, targets: Tensor, h0: Tensor, params: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """The mean cross-entropy of one minibatch (differentiable for ``params``: an ``nn.RNN``
    layer's W_ih, b_ih, W_hh, b_hh, then the output layer's W, b) and the new state (B, H)."""
    loss, h_last, *_ = torch.ops.rnnlm_cpu.rnn_train_loss(ids, targets, h0, *params)
    return loss, h_last


def loss_and_grads(
    ids: Tensor, targets: Tensor, h0: Tensor, params: Sequence[Tensor]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The operator's results without an autograd graph: the loss, the new state and the
    gradients of the loss for ``params``."""
    with torch.no_grad():
        loss, h_last, *grads = torch.ops.rnnlm_cpu.rnn_train_loss(ids, targets, h0, *params)
    return loss, h_last, grads


def clip_sgd_(params: Sequence[Tensor], max_norm: float, lr: float) -> Tensor:
    """Clip the gradients of ``params`` to the global L2 norm ``max_norm``, then take the SGD
    step; returns the norm before clipping. Every parameter must have a gradient."""
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise ValueError("clip_sgd_ needs a gradient for every parameter")
    with torch.no_grad():
        norm = torch.ops.rnnlm_cpu.clip_sgd_(list(params), grads, max_norm, lr)
    torch.autograd.graph.increment_version(params)  # they changed in place
    return norm
