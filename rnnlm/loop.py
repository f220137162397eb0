"""One epoch of training with the chapter's ``train_epoch_ch8`` semantics, across ranks.

Each rank trains on its own rows of every minibatch and carries the hidden state of those rows
from one minibatch to the next. Loss and token counts stay on the device during the epoch (no
host sync per step) and are summed over ALL ranks at its end, in one collective.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from rnnlm.batching import Minibatch
from rnnlm.distributed import DistInfo, all_reduce_sum
from rnnlm.errors import NonFiniteLoss
from rnnlm.records import EpochProgress, EpochStats, detach_state
from rnnlm.steps import Step

MAX_LOG_PERPLEXITY = math.log(1e300)  # a diverged model: exp() would overflow


@dataclass
class Epoch:
    """One report's work for this rank: a pass over the text, or (``--max-steps``) a number of
    minibatches of the stream of passes."""

    number: int  # what the report is called: the epoch, or the global step at its end
    batches: Iterable[tuple[bool, Minibatch]]  # (start from a fresh state?, this rank's rows)
    progress: EpochProgress | None = None  # a resumed one: where it stopped


def in_order(batches: Iterable[Minibatch]) -> Iterator[tuple[bool, Minibatch]]:
    """One pass of sequential minibatches: a fresh state first, then the state carried."""
    for i, batch in enumerate(batches):
        yield i == 0, batch


def train_epoch(
    step: Step,
    epoch: Epoch,
    info: DistInfo,
    after_step: Callable[[EpochProgress], None] | None = None,
) -> EpochStats:
    """Train over ``epoch``'s batches (after what its progress has done); ``after_step`` sees
    the progress after every minibatch (checkpoints, preemption)."""
    device = info.device
    progress = epoch.progress or EpochProgress.start(device)
    tokens_before = progress.num_tokens
    started_at = time.time()
    start = time.perf_counter()
    for fresh, (x, y) in epoch.batches:
        # Compact ids (one byte each, usually) cross to the device, then widen there.
        x, y = x.to(device, non_blocking=True).long(), y.to(device, non_blocking=True).long()
        state = progress.state
        if state is None or fresh:
            state = step.module.begin_state(x.shape[0], device)
        else:
            # Truncated BPTT: keep the values of the carried state (row b continues the same
            # text) but cut the graph, so backward stops at this minibatch's first step.
            state = detach_state(state)
        loss, norm, state = step(x, y, state)
        progress.add(loss, norm, y.numel(), state)
        if after_step is not None:
            after_step(progress)
    rank_seconds = time.perf_counter() - start
    return _epoch_stats(step, epoch.number, info, progress, tokens_before, (start, started_at),
                        rank_seconds)  # fmt: skip


def _epoch_stats(
    step: Step,
    number: int,
    info: DistInfo,
    progress: EpochProgress,
    tokens_before: int,
    starts: tuple[float, float],
    rank_seconds: float,
) -> EpochStats:
    """The epoch's one collective: the sums, and in this rank's own column its tokens/s and its
    first non-finite step + 1 (0: none), which the sum gathers from every rank. So every rank
    learns of a NaN on any rank at the same point, and all stop with the same error."""
    rank_tokens_now = progress.num_tokens - tokens_before  # a resumed epoch ran only part
    world, device = info.world_size, info.device
    per_rank = torch.zeros(2, world, dtype=torch.float64, device=device)
    per_rank[0, info.rank] = rank_tokens_now / rank_seconds
    per_rank[1, info.rank] = progress.bad_step + 1
    counts = torch.tensor(
        [progress.num_tokens, rank_tokens_now], dtype=torch.float64, device=device
    )
    totals = torch.cat([progress.loss_sum.reshape(1), counts, per_rank.reshape(-1)])
    all_reduce_sum(totals, info)
    seconds = time.perf_counter() - starts[0]
    total_loss, total_tokens, tokens_now, *gathered = totals.tolist()
    rates, bad_steps = gathered[:world], [int(b) - 1 for b in gathered[world:] if b > 0]
    if bad_steps:
        raise NonFiniteLoss(number, min(bad_steps))
    mean_loss = total_loss / total_tokens
    if mean_loss > MAX_LOG_PERPLEXITY:  # finite losses, but a perplexity beyond any float
        raise NonFiniteLoss(number, progress.step)
    return EpochStats(
        epoch=number,
        perplexity=math.exp(mean_loss),
        num_tokens=int(total_tokens),
        seconds=seconds,
        tokens_per_s=tokens_now / seconds,
        rank_tokens_per_s=rank_tokens_now / rank_seconds,
        tokens_per_s_by_rank=tuple(rates),
        grad_norm=progress.norm_sum.item() / max(progress.step, 1),
        lr=step.optimizer.param_groups[0]["lr"],
        started_at=starts[1],
    )
