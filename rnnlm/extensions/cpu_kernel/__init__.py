"""The CPU kernel extension: the chapter's model trained through two fused operators on an
x86-64 CPU (see README.md beside this file for what each piece buys).

- :class:`KernelRNNLM` is :class:`rnnlm.model.RNNLM` (the same parameters and state_dict) whose
  training loss is one operator, ``rnnlm_cpu::rnn_train_loss``: forward and backward through
  the whole minibatch in one call of ``kernel.c``, its gradients handed to autograd.
- :class:`KernelStep` is :class:`rnnlm.steps.EagerStep` whose clipping and SGD update are one
  operator, ``rnnlm_cpu::clip_sgd_``.

Both run under autograd, so across ranks DDP averages their gradients as it does the core's.
The job composes them through :func:`train_spec`; where the extension does not apply or cannot
build, the job trains on the core and says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from rnnlm.config import TrainConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError
from rnnlm.extensions.cpu_kernel import build, ops
from rnnlm.model import RNNLM
from rnnlm.records import State
from rnnlm.steps import EagerStep, TrainSpec

log = logging.getLogger(__name__)


class KernelRNNLM(RNNLM):
    """The chapter's model (one ``rnn`` layer) with its training loss in one operator; without
    targets (validation, generation) it is :class:`RNNLM` itself."""

    def forward(
        self, inputs: Tensor, state: State, targets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if targets is None:
            return super().forward(inputs, state)
        loss, h_last = ops.train_loss(inputs, targets, _first_layer(state), self.kernel_params())
        return loss, h_last.unsqueeze(0)

    def kernel_params(self) -> list[Tensor]:
        """The parameters in the operator's order: W_ih, b_ih, W_hh, b_hh, then W, b."""
        rnn, linear = self.rnn, self.linear
        params = [rnn.weight_ih_l0, rnn.bias_ih_l0, rnn.weight_hh_l0, rnn.bias_hh_l0,
                  linear.weight, linear.bias]  # fmt: skip
        return cast(list[Tensor], params)


class KernelStep(EagerStep):
    """The eager step with clipping and the SGD update in one operator.

    Under DDP the step runs through autograd, whose hooks average the gradients over the ranks.
    In one process there is nothing to average, and the step takes the gradients straight from
    the loss operator, without recording a graph for autograd to walk back (what that saves is
    ``direct_vs_autograd`` in ``benchmarks/bench_cpu_kernel.py``); chosen once, here.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                 autocast: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(model, optimizer, clip, autocast)
        alone = model is self.module and isinstance(model, KernelRNNLM)
        self.run = self.without_autograd if alone else super().__call__

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        return self.run(x, y, state)

    def without_autograd(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        params = cast(KernelRNNLM, self.module).kernel_params()
        loss, h_last, grads = ops.loss_and_grads(x, y, _first_layer(state), params)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        return loss, self.clip_and_step(), h_last.unsqueeze(0)

    def clip_and_step(self) -> Tensor:
        return ops.clip_sgd_(self.params, self.clip, self.optimizer.param_groups[0]["lr"])


def _first_layer(state: State) -> Tensor:
    if not isinstance(state, Tensor) or state.requires_grad:
        raise ValueError("the kernel trains from a detached (1, B, H) state")
    return state[0]


def does_not_apply(config: TrainConfig, info: DistInfo) -> str | None:
    """Why this job's model or device is not the kernel's, or None."""
    model = config.model
    if info.device.type != "cpu":
        return f"it runs on the CPU, and this job runs on {info.device.type}"
    if model.cell != "rnn" or model.num_layers != 1:
        return (f"it trains one rnn layer, and this job has --cell {model.cell} "
                f"--num-layers {model.num_layers}")  # fmt: skip
    return build.why_unavailable()


def train_spec(config: TrainConfig, info: DistInfo, cache_dir: Path) -> TrainSpec:
    """The extension's :class:`TrainSpec` where ``--cpu-kernel`` (auto or compiled) and the
    job allow it; the core's otherwise (``compiled`` then refuses with a one-line error)."""
    why = does_not_apply(config, info)
    isa = None
    if why is None:
        try:
            isa = build.load(cache_dir)
        except build.UnsupportedCapability as exc:
            raise FlagError(build.ISA_ENV, f"{exc}. Unset it, or name one of those.") from None
        except build.Unavailable as exc:
            why = str(exc)
    if isa is None:
        if config.runtime.cpu_kernel == "compiled":
            raise FlagError(
                "--cpu-kernel", f"the compiled kernel cannot run here: {why}; use auto or torch."
            )
        log.info("training on the framework's layers, not the CPU kernel: %s", why)
        return TrainSpec()
    ops.register()
    return TrainSpec(f"cpu-kernel ({isa})", KernelRNNLM, KernelStep)
