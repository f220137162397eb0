"""One epoch of training with the chapter's ``train_epoch_ch8`` semantics, across ranks.

Each rank trains on its own rows of every minibatch; DDP averages the gradients, so the update
equals the single-process update on the whole global batch. Loss and token counts stay on the
device during the epoch (no host sync per step) and are summed over ALL ranks at its end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnlm.batching import Minibatch
from rnnlm.distributed import DistInfo, all_reduce_sum
from rnnlm.errors import UserError
from rnnlm.model import RNNLM, State, detach_state


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
    optimizer: torch.optim.Optimizer,
    clip: float,
    reset_state_every_batch: bool,
    info: DistInfo,
    epoch: int,
    progress: EpochProgress | None = None,
    after_step: Callable[[EpochProgress], None] | None = None,
) -> EpochStats:
    """Train over ``batches`` (this rank's rows). ``model`` may be the DDP wrapper of ``module``.

    ``progress`` resumes an epoch part-way (its first ``progress.step`` minibatches are
    skipped); ``after_step`` sees the progress after every minibatch (checkpoints, preemption).
    """
    device = info.device
    params = [p for p in module.parameters() if p.requires_grad]
    progress = progress or EpochProgress.start(device)
    start = time.perf_counter()
    tokens_before = progress.num_tokens
    for x, y in batches[progress.step :]:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        state = progress.state
        if state is None or reset_state_every_batch:
            state = module.begin_state(x.shape[0], device)
        else:
            # Truncated BPTT: keep the values of the carried state (row b continues the same
            # text) but cut the graph, so backward stops at this minibatch's first step.
            state = detach_state(state)
        targets = y.T.reshape(-1)  # time-major, matching the logits (T*B,)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits, targets)  # mean over this rank's T*B/W targets
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages gradients over ranks: the mean over the global batch
        progress.norm_sum += clip_gradients(params, clip)
        optimizer.step()
        loss = loss.detach()
        progress.loss_sum += loss * targets.numel()
        progress.step += 1
        progress.num_tokens += targets.numel()
        progress.state = state
        progress.bad_step = torch.where(
            torch.isfinite(loss) | (progress.bad_step >= 0), progress.bad_step, progress.step
        )
        if after_step is not None:
            after_step(progress)
    progress.check_finite(epoch)
    rank_seconds = time.perf_counter() - start
    rank_tokens_now = progress.num_tokens - tokens_before  # a resumed epoch ran only part
    totals = torch.tensor(
        [0.0, float(progress.num_tokens), float(rank_tokens_now)],
        device=device,
        dtype=torch.float64,
    )
    totals[0] = progress.loss_sum
    all_reduce_sum(totals, info)
    seconds = time.perf_counter() - start
    total_loss, total_tokens, tokens_now = totals.tolist()
    return EpochStats(
        epoch=epoch,
        perplexity=math.exp(total_loss / total_tokens),
        num_tokens=int(total_tokens),
        seconds=seconds,
        tokens_per_s=tokens_now / seconds,
        rank_tokens_per_s=rank_tokens_now / rank_seconds,
        grad_norm=progress.norm_sum.item() / max(progress.step, 1),
        lr=optimizer.param_groups[0]["lr"],
    )
