"""One epoch of training with the chapter's ``train_epoch_ch8`` semantics, across ranks.

Each rank trains on its own rows of every minibatch; DDP averages the gradients, so the update
equals the single-process update on the whole global batch. Loss and token counts stay on the
device during the epoch (no host sync per step) and are summed over ALL ranks at its end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnlm.batching import Minibatch
from rnnlm.distributed import DistInfo, all_reduce_sum
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


def train_epoch(
    model: nn.Module,
    module: RNNLM,
    batches: Iterable[Minibatch],
    optimizer: torch.optim.Optimizer,
    clip: float,
    reset_state_every_batch: bool,
    info: DistInfo,
    epoch: int,
) -> EpochStats:
    """Train over ``batches`` (this rank's rows). ``model`` may be the DDP wrapper of ``module``."""
    device = info.device
    params = [p for p in module.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    norm_sum = torch.zeros((), device=device)
    num_steps = 0
    num_local_tokens = 0
    state: State | None = None
    start = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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
        norm_sum += clip_gradients(params, clip)
        optimizer.step()
        loss_sum += loss.detach() * targets.numel()
        num_local_tokens += targets.numel()
        num_steps += 1
    rank_seconds = time.perf_counter() - start
    totals = torch.stack(
        [loss_sum, torch.tensor(float(num_local_tokens), device=device, dtype=torch.float64)]
    )
    all_reduce_sum(totals, info)
    seconds = time.perf_counter() - start
    total_loss, total_tokens = totals.tolist()
    return EpochStats(
        epoch=epoch,
        perplexity=math.exp(total_loss / total_tokens),
        num_tokens=int(total_tokens),
        seconds=seconds,
        tokens_per_s=total_tokens / seconds,
        rank_tokens_per_s=num_local_tokens / rank_seconds,
        grad_norm=norm_sum.item() / max(num_steps, 1),
        lr=optimizer.param_groups[0]["lr"],
    )
