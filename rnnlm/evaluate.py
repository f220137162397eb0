"""Validation perplexity on held-out text, computed by all ranks and summed over them.

The held-out ids are laid out like a training epoch with no offset: ``B`` (the global batch)
contiguous rows, each rank evaluating its own rows window by window with the state carried, so
the result is the same for any number of ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from rnnlm.batching import Minibatch, rows_of_rank
from rnnlm.distributed import DistInfo, all_reduce_sum
from rnnlm.model import RNNLM
from rnnlm.records import State


def validation_batches(
    ids: Tensor, batch_size: int, num_steps: int, rank: int = 0, world_size: int = 1
) -> list[Minibatch]:
    """Windows of ``num_steps`` over ``batch_size`` rows (the last window may be shorter)."""
    row_len = (len(ids) - 1) // batch_size
    xs = ids[: batch_size * row_len].reshape(batch_size, row_len)
    ys = ids[1 : batch_size * row_len + 1].reshape(batch_size, row_len)
    rows = rows_of_rank(rank, world_size, batch_size)
    xs, ys = xs[rows], ys[rows]
    return [
        (xs[:, i : i + num_steps], ys[:, i : i + num_steps]) for i in range(0, row_len, num_steps)
    ]


@torch.no_grad()
def evaluate(module: RNNLM, batches: list[Minibatch], info: DistInfo) -> float:
    """Perplexity over all ranks' rows. Every rank must call it (it sums over the ranks)."""
    was_training = module.training
    module.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)
    state: State | None = None
    for x, y in batches:
        x, y = x.to(info.device).long(), y.to(info.device).long()
        if state is None:
            state = module.begin_state(x.shape[0], info.device)
        logits, state = module(x, state)
        targets = y.T.reshape(-1)
        totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        totals[1] += targets.numel()
    module.train(was_training)
    all_reduce_sum(totals, info)
    return math.exp((totals[0] / totals[1]).item())
