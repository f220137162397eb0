"""One training step, and the one place where the job's step variant is chosen.

A step is ``train_epoch_ch8``'s body: forward and loss, backward (under DDP, whose hooks
average the gradients over the ranks, so the update equals the one-process update on the
global batch), gradient clipping to the global L2 norm, the SGD update.

The variants -- eager, bf16 autocast (CUDA), a captured CUDA graph (CUDA, one process), and
whatever an optional extension supplies through a :class:`TrainSpec` -- are picked once, by
:func:`make_step`; the loop only ever calls the step it was given.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from rnnlm.config import RuntimeConfig
from rnnlm.model import RNNLM
from rnnlm.records import State


class Step(Protocol):
    module: RNNLM  # the unwrapped model: begin_state, and what the step updates
    optimizer: torch.optim.Optimizer

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        """Train on one minibatch from ``state``; return the mean loss and the gradient norm
        before clipping (both detached, on the device) and the new state."""
        ...


class EagerStep:
    """Forward, loss, backward, clipping and SGD, as ``train_epoch_ch8`` does them."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: float,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.module: RNNLM = cast(RNNLM, getattr(model, "module", model))  # DDP: .module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.precision: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
        if autocast is not None:  # the forward pass in ``autocast``, the update in fp32
            device = self.params[0].device.type
            self.precision = functools.partial(torch.autocast, device, dtype=autocast)

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        with self.precision():
            loss, state = self.model(x, state, y)  # the mean over this rank's targets
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over ranks: the mean over the global batch
        return loss.detach(), self.clip_and_step(), state

    def clip_and_step(self) -> Tensor:
        """Clip to the global L2 norm (d2l's ``grad_clipping`` rule), then the SGD update;
        returns the norm before clipping."""
        norm = nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return norm


class GraphedStep:
    """A step captured once as a CUDA graph and replayed per minibatch: one launch instead of
    hundreds of kernel launches. Inputs and state are copied into fixed buffers before each
    replay; the replay computes exactly what the eager step computes.

    One process only (the capture does not include DDP's collectives).
    """

    def __init__(self, eager: EagerStep, batch: int, steps: int) -> None:
        module = self.module = eager.module
        self.optimizer = eager.optimizer
        device = next(module.parameters()).device
        self.x = torch.zeros((batch, steps), dtype=torch.long, device=device)
        self.y = torch.zeros((batch, steps), dtype=torch.long, device=device)
        self.state_in = module.begin_state(batch, device)
        # Warm-up iterations (required before capture) must not move the weights.
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(self.x, self.y, self.state_in)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            module.load_state_dict(saved)
        eager.optimizer.zero_grad(set_to_none=True)  # gradients then live in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.norm, self.state_out = eager(self.x, self.y, self.state_in)

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        self.x.copy_(x)
        self.y.copy_(y)
        _copy_state(self.state_in, state)
        self.graph.replay()
        return self.loss, self.norm, self.state_out


def _copy_state(dst: State, src: State) -> None:
    if isinstance(dst, tuple) and isinstance(src, tuple):
        dst[0].copy_(src[0])
        dst[1].copy_(src[1])
    elif isinstance(dst, Tensor) and isinstance(src, Tensor):
        dst.copy_(src)
    else:
        raise TypeError("state kinds differ")


@dataclass(frozen=True)
class TrainSpec:
    """The parts of training an extension may replace, chosen once by the entry point.

    ``model_class`` must keep :class:`RNNLM`'s parameters (the same state_dict) and may compute
    the training loss its own way; ``step_class`` may fuse clipping and the update. Both run
    under autograd, so DDP averages their gradients as it does the core's.
    """

    name: str = "torch"  # what the job logs as the path it took
    model_class: type[RNNLM] = RNNLM
    step_class: type[EagerStep] = EagerStep


def make_step(
    spec: TrainSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: float,
    runtime: RuntimeConfig,
    local_batch: tuple[int, int],
) -> Step:
    """The job's step: ``spec``'s, under bf16 autocast or captured as a CUDA graph where
    ``runtime`` asks for it. ``local_batch``: this rank's (rows, time steps)."""
    autocast = torch.bfloat16 if runtime.autocast == "bf16" else None
    eager = spec.step_class(model, optimizer, clip, autocast)
    if not runtime.cuda_graphs:
        return eager
    return GraphedStep(eager, *local_batch)
