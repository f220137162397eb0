"""One epoch of training with the chapter's ``train_epoch_ch8`` semantics, across ranks.

Each rank trains on its own rows of every minibatch; DDP averages the gradients, so the update
equals the single-process update on the whole global batch. Loss and token counts stay on the
device during the epoch (no host sync per step) and are summed over ALL ranks at its end.

A step is run by a :class:`Step`: :class:`CompiledStep` (the chapter's model on the compiled CPU
kernel: the whole step in kernel calls, outside autograd), :class:`EagerStep` (everything else;
optionally under bf16 autocast on CUDA) or :class:`GraphedStep` (one CUDA graph replayed per
minibatch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rnnlm.batching import Minibatch
from rnnlm.distributed import DistInfo, SumOverRanks, all_reduce_sum
from rnnlm.errors import UserError
from rnnlm.model import RNNLM, State, detach_state
from rnnlm.native import ClipSGDCall, TrainStepCall


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    perplexity: float
    num_tokens: int  # over all ranks
    seconds: float
    tokens_per_s: float  # over all ranks
    rank_tokens_per_s: float  # this rank's share
    grad_norm: float  # mean norm before clipping over the epoch's steps
    lr: float
    started_at: float = 0.0  # wall-clock time (time.time()) when the epoch's first step began
    tokens_per_s_by_rank: tuple[float, ...] = ()  # every rank's share, in rank order


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """d2l ``grad_clipping``: if the global L2 norm exceeds ``max_norm``, scale every gradient
    by ``max_norm / norm``. Returns the norm before clipping, without a host sync.

    (``torch.nn.utils.clip_grad_norm_`` adds 1e-6 to the norm, which moves the numbers.)
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / norm, max=1.0)
    torch._foreach_mul_(grads, scale)
    return norm


class Optimizer(Protocol):
    param_groups: list[dict[str, Any]]

    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def step(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SGD:
    """The chapter's optimiser, ``p <- p - lr * grad`` (``torch.optim.SGD`` without momentum or
    weight decay, which computes ``p.add_(grad, alpha=-lr)``: the same numbers).

    Why not ``torch.optim.SGD``: constructing any ``torch.optim`` optimiser imports torch's
    compiler stack, about a second of every job's start-up, for features this job never uses.
    ``state_dict`` follows ``torch.optim``'s layout (no per-parameter state).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [{"params": self.params, "lr": lr}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        with_grad: list[Tensor] = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad if p.grad is not None]
        torch._foreach_add_(with_grad, grads, alpha=-self.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        group = {"lr": self.param_groups[0]["lr"], "params": list(range(len(self.params)))}
        return {"state": {}, "param_groups": [group]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param_groups[0]["lr"] = state["param_groups"][0]["lr"]


class Step(Protocol):
    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        """Train on one minibatch from ``state``; return the mean loss and the gradient norm
        (both detached, on the device) and the new state."""
        ...


class EagerStep:
    """Forward, loss, backward, clipping and SGD, as ``train_epoch_ch8`` does them."""

    def __init__(
        self,
        model: nn.Module,
        module: RNNLM,
        optimizer: Optimizer,
        clip: float,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model, self.optimizer, self.clip = model, optimizer, clip
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.autocast = autocast
        self.module = module

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        with torch.autocast(
            x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            loss, state = self.model(x, state, y)  # the mean over this rank's targets
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over ranks: the mean over the global batch
        return loss.detach(), self._clip_and_step(), state

    def _clip_and_step(self) -> Tensor:
        """Clip, then step; the compiled kernel does both in one call where it can (the
        framework's way took ~15 operations); returns the norm before clipping."""
        kernel = self.module.kernel
        if kernel is not None and isinstance(self.optimizer, SGD):
            norm = kernel.clip_sgd(self.params, self.clip, self.optimizer.param_groups[0]["lr"])
            if norm is not None:
                return norm
        norm = clip_gradients(self.params, self.clip)
        self.optimizer.step()
        return norm


class SharedGradients(Protocol):
    """Gradients every rank can read (:class:`rnnlm.shm_allreduce.SharedMemoryAllReduce`)."""

    def own_slot(self, numel: int) -> Tensor:
        """Where this rank writes its gradients (flat, undivided) before :meth:`gather`."""
        ...

    def gather(self, numel: int) -> Tensor:
        """Collective: every rank's gradients, (world, numel) in rank order."""
        ...


class CompiledStep:
    """:class:`EagerStep` for the chapter's model (one tanh layer, the compiled kernel, SGD) as
    two kernel calls outside autograd: the whole forward and backward pass
    (:meth:`~rnnlm.native.TanhRecurrenceKernel.rnn_train_step`), then clipping and the SGD
    step. The same operations as EagerStep's on the kernel, so the same bits; what it saves is
    the framework's work around them, ~0.7-0.9 ms of a 3-5 ms step (autograd's graph, ~100
    small operations, their Python).

    Without autograd there is no backward pass for DDP's gradient hooks to join, so across
    ranks the step does their work, averaging the gradients (all of them, one flat buffer) as
    DDP's hook would (see :func:`rnnlm.pipeline.make_step`): through ``shared`` memory, where
    the kernel writes them straight into this rank's slot and the clipping call averages the
    gathered slots first; else through ``average`` (the process group), in place, before
    clipping.
    """

    def __init__(
        self,
        module: RNNLM,
        optimizer: SGD,
        clip: float,
        average: Callable[[Tensor], object] | None = None,
        shared: SharedGradients | None = None,
    ) -> None:
        if not CompiledStep.can_run(module, optimizer):
            raise ValueError("CompiledStep runs a one-layer tanh RNN on the compiled kernel")
        if average is not None and shared is not None:
            raise ValueError("gradients are averaged through shared memory or the process group")
        self.module, self.optimizer, self.clip = module, optimizer, clip
        self.average, self.shared = average, shared
        self.params = list(module.parameters())  # clipping sums their squares in this order
        self.kernel_order: list[Tensor] = [*module.layer_weights(0)]
        self.kernel_order += [module.linear.weight, module.linear.bias]
        # Every gradient a view of one buffer: one all-reduce a step across ranks.
        self.flat_grads = torch.zeros(sum(p.numel() for p in self.params))
        self.grads = self._views(self.flat_grads)
        self.kernel_grads = [self.grads[p] for p in self.kernel_order]
        assert module.kernel is not None
        for p in self.params:
            p.grad = self.grads[p]
        # The kernel's calls for these tensors, checked and gathered once.
        self.train_call = TrainStepCall(module.kernel, self.kernel_order)
        self.into_flat = self.train_call.add_gradients(self.kernel_grads)
        clip_call = ClipSGDCall.of(module.kernel, self.params)
        assert clip_call is not None  # can_run checked what it needs
        self.clip_call = clip_call
        self._into_slot: dict[int, int] = {}  # a shared slot's address -> its gradients' set

    def _views(self, flat: Tensor) -> dict[Tensor, Tensor]:
        """Each parameter's gradient as a view of ``flat``, in the order of ``self.params``."""
        views = flat.split([p.numel() for p in self.params])
        return {p: v.view_as(p) for p, v in zip(self.params, views, strict=True)}

    @staticmethod
    def can_run(module: RNNLM, optimizer: Optimizer) -> bool:
        params = list(module.parameters())
        return (
            module.kernel is not None
            and module.fast_cpu
            and module.config.num_layers == 1
            and isinstance(optimizer, SGD)
            and all(p.requires_grad and p.dtype == torch.float32 for p in params)
            and all(p.device.type == "cpu" and p.is_contiguous() for p in params)
        )

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        assert isinstance(state, Tensor)
        for p in self.params:  # where they were set to None (zero_grad), they come back
            if p.grad is not self.grads[p]:
                p.grad = self.grads[p]
        h_last = torch.empty_like(state)
        ids, targets = x.long().contiguous(), y.long().contiguous()
        h0 = state[0].contiguous()
        numel, lr = self.flat_grads.numel(), self.optimizer.param_groups[0]["lr"]
        into = self.into_flat if self.shared is None else self._in_slot(self.shared, numel)
        loss = self.train_call(ids, targets, h0, h_last[0], into)
        if self.shared is not None:
            slots = self.shared.gather(numel)
            return loss, self.clip_call.average_clip_sgd(slots, self.clip, lr), h_last
        if self.average is not None:
            self.average(self.flat_grads)
        return loss, self.clip_call.clip_sgd(self.clip, lr), h_last

    def _in_slot(self, shared: SharedGradients, numel: int) -> int:
        """The kernel's gradient set in this rank's next shared slot (two slots take turns, so
        each is set up once)."""
        slot = shared.own_slot(numel)
        address = slot.data_ptr()
        if address not in self._into_slot:
            views = self._views(slot)
            grads = [views[p] for p in self.kernel_order]
            self._into_slot[address] = self.train_call.add_gradients(grads)
        return self._into_slot[address]


def default_step(model: nn.Module, module: RNNLM, optimizer: Optimizer, clip: float) -> Step:
    """:class:`CompiledStep` where it can run in one process, else :class:`EagerStep`."""
    if model is module and CompiledStep.can_run(module, optimizer):
        assert isinstance(optimizer, SGD)
        return CompiledStep(module, optimizer, clip)
    return EagerStep(model, module, optimizer, clip)


class GraphedStep:
    """The whole :class:`EagerStep` captured once as a CUDA graph and replayed per minibatch:
    one launch instead of hundreds of kernel launches. Inputs and state are copied into fixed
    buffers before each replay; the replay computes exactly what the eager step computes.

    Single process only (the capture does not include DDP's collectives).
    """

    def __init__(self, eager: EagerStep, module: RNNLM, batch: int, steps: int) -> None:
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


class NonFiniteLoss(UserError):
    """Training diverged; the message names where, and no checkpoint is written after it."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(
            f"--lr: the loss became NaN/inf at epoch {epoch}, step {step}; training stopped "
            "and the last good checkpoint is kept. Lower --lr or --clip, or check the data."
        )


@dataclass
class EpochProgress:
    """An epoch in flight: what a checkpoint saves and a resumed epoch starts from.

    The sums are this rank's and stay on the device (no host sync per step).
    """

    loss_sum: Tensor  # sum of loss * tokens (float64)
    norm_sum: Tensor  # sum of pre-clipping gradient norms
    bad_step: Tensor  # first step (1-based) whose loss was NaN/inf, or -1
    step: int = 0  # minibatches done
    num_tokens: int = 0  # this rank's targets so far
    state: State | None = None  # carried hidden state after ``step`` minibatches

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        return cls(
            loss_sum=torch.zeros((), device=device, dtype=torch.float64),
            norm_sum=torch.zeros((), device=device),
            bad_step=torch.full((), -1, device=device, dtype=torch.long),
        )

    def check_finite(self, epoch: int) -> None:
        bad = int(self.bad_step.item())
        if bad >= 0:
            raise NonFiniteLoss(epoch, bad)


def train_epoch(
    model: nn.Module,
    module: RNNLM,
    batches: Sequence[Minibatch],
    optimizer: Optimizer,
    clip: float,
    reset_state_every_batch: bool,
    info: DistInfo,
    epoch: int,
    step: Step | None = None,
    step_losses: list[Tensor] | None = None,
    progress: EpochProgress | None = None,
    after_step: Callable[[EpochProgress], None] | None = None,
    sum_over_ranks: SumOverRanks | None = None,
) -> EpochStats:
    """Train over ``batches`` (this rank's rows). ``model`` may be the DDP wrapper of ``module``.

    ``step`` runs one minibatch (default: :func:`default_step`); ``step_losses``, when given,
    receives every step's loss as a device tensor (nothing is synchronised to collect it).
    ``progress`` resumes an epoch part-way (its first ``progress.step`` minibatches are
    skipped); ``after_step`` sees the progress after every minibatch (checkpoints, preemption).
    The epoch's totals are summed over the ranks by ``sum_over_ranks`` (default: the process
    group's all-reduce), once per epoch.
    """
    device = info.device
    step = step or default_step(model, module, optimizer, clip)
    progress = progress or EpochProgress.start(device)
    tokens_before = progress.num_tokens
    started_at = time.time()
    start = time.perf_counter()
    for x, y in batches[progress.step :]:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        state = progress.state
        if state is None or reset_state_every_batch:
            state = module.begin_state(x.shape[0], device)
        else:
            # Truncated BPTT: keep the values of the carried state (row b continues the same
            # text) but cut the graph, so backward stops at this minibatch's first step.
            state = detach_state(state)
        loss, norm, state = step(x, y, state)
        progress.norm_sum += norm
        progress.loss_sum += loss * y.numel()
        progress.step += 1
        progress.num_tokens += y.numel()
        progress.state = state
        progress.bad_step = torch.where(
            torch.isfinite(loss) | (progress.bad_step >= 0), progress.bad_step, progress.step
        )
        if step_losses is not None:
            step_losses.append(loss.clone())
        if after_step is not None:
            after_step(progress)
    rank_seconds = time.perf_counter() - start
    rank_tokens_now = progress.num_tokens - tokens_before  # a resumed epoch ran only part
    # One collective for the epoch: the sums, and in this rank's own column its tokens/s and its
    # first non-finite step + 1 (0: none), which the sum gathers from every rank. So every rank
    # learns of a NaN on any rank at the same point, and all stop with the same error.
    world = info.world_size
    per_rank = torch.zeros(2, world, dtype=torch.float64, device=device)
    per_rank[0, info.rank] = rank_tokens_now / rank_seconds
    per_rank[1, info.rank] = progress.bad_step + 1
    counts = torch.tensor(
        [progress.num_tokens, rank_tokens_now], dtype=torch.float64, device=device
    )
    totals = torch.cat([progress.loss_sum.reshape(1), counts, per_rank.reshape(-1)])
    all_reduce_sum(totals, info, via=sum_over_ranks)
    seconds = time.perf_counter() - start
    total_loss, total_tokens, tokens_now, *gathered = totals.tolist()
    rates, bad_steps = gathered[:world], [int(b) - 1 for b in gathered[world:] if b > 0]
    if bad_steps:
        raise NonFiniteLoss(epoch, min(bad_steps))
    return EpochStats(
        epoch=epoch,
        perplexity=math.exp(total_loss / total_tokens),
        num_tokens=int(total_tokens),
        seconds=seconds,
        tokens_per_s=tokens_now / seconds,
        rank_tokens_per_s=rank_tokens_now / rank_seconds,
        tokens_per_s_by_rank=tuple(rates),
        grad_norm=progress.norm_sum.item() / max(progress.step, 1),
        lr=optimizer.param_groups[0]["lr"],
        started_at=started_at,
    )
