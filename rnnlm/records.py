"""The records the job's parts hand one another: an epoch's figures, an epoch in flight, the
position in the stream of minibatches, the history of a run, the recurrent state.

They live apart from the code that produces them, so that reporting and checkpointing never
import the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnnlm.errors import NonFiniteLoss

# A GRU/RNN state is one tensor (L, B, H); an LSTM state is the pair (h, c).
State = Tensor | tuple[Tensor, Tensor]


def detach_state(state: State) -> State:
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()


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

    def add(self, loss: Tensor, norm: Tensor, num_tokens: int, state: State) -> None:
        """Count one minibatch; remember the first non-finite loss without a host sync."""
        self.norm_sum += norm
        self.loss_sum += loss * num_tokens
        self.step += 1
        self.num_tokens += num_tokens
        self.state = state
        self.bad_step = torch.where(
            torch.isfinite(loss) | (self.bad_step >= 0), self.bad_step, self.step
        )

    def check_finite(self, epoch: int) -> None:
        bad = int(self.bad_step.item())
        if bad >= 0:
            raise NonFiniteLoss(epoch, bad)


@dataclass
class Cursor:
    """Where a job is in its stream of minibatches: pass ``number`` over the text, whose layout
    the shared generator drew from ``rng_state``, ``done`` minibatches into it."""

    number: int = 1
    done: int = 0
    rng_state: Any = None

    def next_pass(self, rng_state: Any) -> None:
        self.number, self.done, self.rng_state = self.number + 1, 0, rng_state


@dataclass
class History:
    """What the job has reported so far; checkpointed so a resumed job reports it whole."""

    epochs: list[EpochStats] = field(default_factory=list)
    val_perplexity: list[float] = field(default_factory=list)
    extra_metrics: list[dict[str, float]] = field(default_factory=list)  # per epoch
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (epoch, prefix, text)
